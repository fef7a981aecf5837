"""The simulator's chat template: messages to one prompt string.

It follows SGLang's handling of a trailing assistant message
(``serving_chat._handle_last_assistant_message``): with ``continue_final_message`` its
content becomes an unterminated prefill that generation continues; without it, the
message is treated as a user turn. Because generation is keyed on the prompt's
characters, ``messages + [assistant: partial]`` with ``continue_final_message`` reaches
exactly the state the original request had after producing ``partial``.
"""

from __future__ import annotations

from typing import Any

END = "<|end|>\n"
ASSISTANT = "<|assistant|>\n"  # where the answer starts


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type == "text":
            parts.append(str(part.get("text") or ""))
        else:
            raise ValueError(
                f"message content part of type {part_type!r} is not supported by the simulator "
                "(text only)"
            )
    return "".join(parts)


def final_assistant(messages: list[dict[str, Any]], continue_final_message: bool) -> str | None:
    """The content continue_final_message continues (ReasoningParser's previous_content)."""
    if continue_final_message and messages and messages[-1]["role"] == "assistant":
        content = messages[-1].get("content")
        return content if isinstance(content, str) else None
    return None


def render_chat(
    messages: list[dict[str, Any]],
    continue_final_message: bool,
    generation_prefix: str = "",
    tools: str = "",
) -> str:
    """Render messages (already validated) into the prompt the engine continues.

    `generation_prefix` is what the template writes at the start of the assistant turn
    (DeepSeek-R1's `<think>\n`, sim/reasoning.py); a continued message comes after it.
    `tools` (sim/tool_calls.py render_tools) opens the prompt, as tool-calling templates
    put the tools in the system turn."""
    msgs = list(messages)
    prefix = ""
    if msgs and msgs[-1]["role"] == "assistant" and isinstance(msgs[-1].get("content"), str):
        if continue_final_message:
            prefix = msgs[-1]["content"]
            msgs = msgs[:-1]
        else:
            msgs[-1] = {"role": "user", "content": msgs[-1]["content"]}
    rendered = [f"<|tools|>\n{tools}{END}"] if tools else []
    rendered += [f"<|{m['role']}|>\n{_text(m.get('content'))}{END}" for m in msgs]
    return "".join(rendered) + ASSISTANT + generation_prefix + prefix
