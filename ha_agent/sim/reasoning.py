"""Reasoning output (`--reasoning-parser`): how the simulated model thinks, and how
SGLang splits its thinking out of the answer.

SGLang 0.5.19 (paths under ``python/sglang/srt/``):

* ``parser/reasoning_parser.py``: ``ReasoningParser.DetectorMap`` maps ``qwen3`` to
  ``Qwen3Detector`` and ``deepseek-r1`` to ``DeepSeekR1Detector``, both
  ``BaseReasoningFormatDetector`` with ``<think>`` / ``</think>``. ``Detector`` below is
  that class's streaming (``_parse_streaming_increment_impl``, ``finish``) and one-shot
  (``_detect_and_parse_impl``) parsing with ``stream_reasoning=True``, including
  ``continue_final_message``: the final assistant message is ``previous_content`` and
  decides whether the continuation starts inside the reasoning.
* ``entrypoints/openai/serving_chat.py``: ``_get_reasoning_from_request`` turns thinking
  on for both parsers by default (``reasoning_default`` ``enable_thinking`` for Qwen3,
  off with ``chat_template_kwargs.enable_thinking: false``; always for DeepSeek-R1), and
  that is ``force_reasoning`` and the request's ``require_reasoning``.
* ``managers/schedule_batch.py`` ``Req.update_reasoning_tokens``: ``reasoning_tokens``
  counts generated tokens up to and including ``</think>``; a request that never
  generates one counts every token.

The model side follows the templates: Qwen3's generation prompt is
``<|im_start|>assistant\\n`` and the model writes ``<think>`` itself; DeepSeek-R1's (and
Qwen3-thinking's) prompt already ends with ``<think>\\n``. ``<think>`` and ``</think>``
are single added tokens (not special: they stay in the detokenized text, as on Qwen3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_START = "<tool_call>"  # Qwen3Detector's tool_start_token
PARSERS = ("qwen3", "deepseek-r1")
# What the template itself writes at the start of the assistant turn.
TEMPLATE_THINK = {"qwen3": "", "deepseek-r1": THINK_START + "\n"}


@dataclass(frozen=True)
class ThinkMode:
    """How one generation starts: whether the model writes `<think>` first, and whether
    the context already leaves it inside the reasoning."""

    emit_start: bool
    in_reasoning: bool


@dataclass(frozen=True)
class ReasoningSpec:
    """One chat request's reasoning setup."""

    parser: str
    thinking: bool  # serving_chat._get_reasoning_from_request
    separate: bool  # the request's separate_reasoning
    previous: str | None  # continue_final_message: the final assistant content

    def think_mode(self) -> ThinkMode | None:
        if not self.thinking:
            return None
        prefix = self.previous or ""
        if self.parser == "qwen3":
            start, end = prefix.rfind(THINK_START), prefix.rfind(THINK_END)
            return ThinkMode(emit_start=prefix == "", in_reasoning=start > end)
        return ThinkMode(emit_start=False, in_reasoning=THINK_END not in prefix)

    def detector(self) -> Detector:
        return Detector(
            force_reasoning=self.thinking,
            tool_start=TOOL_START if self.parser == "qwen3" else None,
            previous=self.previous,
        )


def reasoning_tokens(output_ids: list[int], think_end_id: int) -> int:
    """Req.update_reasoning_tokens: tokens up to and including `</think>`, else all."""
    try:
        return output_ids.index(think_end_id) + 1
    except ValueError:
        return len(output_ids)


def _partial(buffer: str, token: str) -> int:
    """_ends_with_partial_token: the longest tail of `buffer` that begins `token`."""
    for i in range(min(len(buffer), len(token) - 1), 0, -1):
        if token.startswith(buffer[-i:]):
            return i
    return 0


class Detector:
    """BaseReasoningFormatDetector with stream_reasoning=True (see the module doc)."""

    def __init__(self, force_reasoning: bool, tool_start: str | None, previous: str | None):
        self._in_reasoning = force_reasoning
        self._tool = tool_start
        self._buffer = ""
        self._stripped_start = False
        self._previous = previous or ""
        if THINK_START in self._previous:
            self._in_reasoning = True
        if THINK_END in self._previous:
            self._in_reasoning = False

    def parse(self, new_text: str) -> tuple[str, str]:
        """(reasoning, normal) text of one streamed delta."""
        self._buffer += new_text
        current = self._buffer
        tokens = [THINK_START, THINK_END] + ([self._tool] if self._tool else [])
        if any(t.startswith(current) and t != current for t in tokens):
            return "", ""
        if not self._stripped_start and THINK_START in current:
            current = current.replace(THINK_START, "", 1)
            self._buffer = current
            self._stripped_start = True
            self._in_reasoning = True
        if self._in_reasoning and THINK_END in current:
            at = current.find(THINK_END)
            self._buffer = ""
            self._in_reasoning = False
            return current[:at], current[at + len(THINK_END) :]
        if self._in_reasoning:
            if self._tool and self._tool in current:
                at = current.find(self._tool)
                self._buffer = ""
                self._in_reasoning = False
                return current[:at], current[at:]
            hold_for = [THINK_END] + ([self._tool] if self._tool else [])
            if not self._stripped_start:
                hold_for.append(THINK_START)
            hold = max(_partial(current, t) for t in hold_for)
            self._buffer = current[len(current) - hold :]
            return current[: len(current) - hold], ""
        self._buffer = ""
        return "", current

    def finish(self) -> tuple[str, str]:
        """What is still held back when the stream ends (not after an abort)."""
        buffer, self._buffer = self._buffer, ""
        if not self._in_reasoning:
            return "", buffer
        if buffer.startswith(THINK_START):
            buffer = buffer[len(THINK_START) :]
        return buffer, ""

    def parse_whole(self, text: str) -> tuple[str, str]:
        """_detect_and_parse_impl: (reasoning, normal) of a whole answer."""
        if not (self._in_reasoning or THINK_START in text):
            return "", text
        while text.startswith(THINK_START):
            text = text[len(THINK_START) :]
        if THINK_END not in text and THINK_END not in self._previous:
            if self._tool and self._tool in text:
                at = text.find(self._tool)
                return text[:at], text[at:]
            return text, ""
        if THINK_END in text:
            reasoning, normal = text.split(THINK_END, 1)
            return reasoning, normal
        return "", text


def chat_template_kwargs(body: dict[str, Any] | None) -> dict[str, Any]:
    return body if isinstance(body, dict) else {}


def thinking_requested(parser: str, kwargs: dict[str, Any]) -> bool:
    """serving_chat._get_reasoning_from_request for the two parsers simulated."""
    if parser == "qwen3":  # reasoning_default "enable_thinking"
        return kwargs.get("enable_thinking") is not False
    return True  # DeepSeekR1Detector: reasoning_default "always"
