"""The simulator's `--tool-call-parser` against SGLang 0.5.19 (paths `python/sglang/srt/`).

`function_call/function_call_parser.py` (`FunctionCallParser`), `function_call/
base_format_detector.py` (`parse_streaming_increment`, `parse_base_json`),
`function_call/qwen25_detector.py` (`Qwen25Detector`), `entrypoints/openai/
serving_chat.py` (`_process_tool_call_stream`, `_check_for_unstreamed_tool_args`,
`_generate_chat_stream`, `_process_tool_calls`, `_validate_request`,
`_tool_call_parsing_active`), `entrypoints/openai/protocol.py`
(`set_tool_choice_default`, `ToolCall`, `DeltaMessage`). 0.5.23 has the same
detector and streaming code for qwen25.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from ha_agent.sim.tool_calls import Detector
from tests.unit.conftest import SimClientFactory, sim_read_sse

pytestmark = pytest.mark.timeout(60)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def _chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS,
        "stream": stream,
        "seed": 3,
        "max_tokens": 120,
        **extra,
    }


def _chunks(payloads: list[str]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def _calls(chunks: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str]:
    """(content, the tool_calls deltas in order, finish_reason)."""
    text, calls, finish = "", [], ""
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
            finish = choice["finish_reason"] or finish
    return text, calls, finish


async def test_a_call_streams_as_sglang_sends_it(sim_client_factory: SimClientFactory) -> None:
    """_process_tool_call_stream: the first tool_calls delta has the id (call_ + 24 hex),
    the name and `arguments: ""`; argument deltas have id and name null; every chunk of
    the tool path is a pydantic dump (all DeltaMessage fields, `usage` null); the finish
    chunk says `tool_calls` with the stop token as matched_stop (_generate_chat_stream).
    Non-stream (_process_tool_calls): the same call, `matched_stop` null."""
    client = await sim_client_factory(itl=0.001, tool_call_parser="qwen25")
    chunks = _chunks(await sim_read_sse(await client.post("/v1/chat/completions", json=_chat())))
    text, calls, finish = _calls(chunks)
    assert finish == "tool_calls"
    first = calls[0]
    assert CALL_ID.fullmatch(first["id"]) and first["type"] == "function"
    assert first["function"]["arguments"] == "" and first["index"] == 0
    name = first["function"]["name"]
    assert name in {"get_weather", "get_time"}
    assert all(c["id"] is None and c["function"]["name"] is None for c in calls[1:])
    arguments = "".join(c["function"]["arguments"] for c in calls)
    if name == "get_weather":
        jsonschema.validate(json.loads(arguments), SCHEMA)
    tool_chunks = [c for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    for c in tool_chunks:
        assert set(c["choices"][0]["delta"]) == {
            "role",
            "content",
            "reasoning_content",
            "tool_calls",
        }
        assert c["usage"] is None
    last = next(c for c in reversed(chunks) if c["choices"])
    assert last["choices"][0]["delta"] == {"reasoning_content": None}
    assert last["choices"][0]["matched_stop"] == 256  # the EOS id that stopped it

    plain = await (await client.post("/v1/chat/completions", json=_chat(stream=False))).json()
    choice = plain["choices"][0]
    assert (choice["finish_reason"], choice["matched_stop"]) == ("tool_calls", None)
    [call] = choice["message"]["tool_calls"]
    assert CALL_ID.fullmatch(call["id"]) and call["function"]["name"] == name
    assert call["function"]["arguments"] == arguments
    # detect_and_parse: the content is the text before the call, stripped.
    assert choice["message"]["content"] == text.strip()


async def test_tool_choice_as_serving_chat_handles_it(sim_client_factory: SimClientFactory) -> None:
    """`none`: no tools in the prompt, plain content; unset with tools: `auto`
    (set_tool_choice_default); a named tool: that one; _validate_request's 400s."""
    client = await sim_client_factory(itl=0.001, tool_call_parser="qwen25")
    post = client.post
    none = await (await post("/v1/chat/completions", json=_chat(False, tool_choice="none"))).json()
    assert none["choices"][0]["message"]["tool_calls"] is None
    assert "<tool_call>" not in none["choices"][0]["message"]["content"]
    auto = await (await post("/v1/chat/completions", json=_chat(False))).json()
    assert auto["choices"][0]["finish_reason"] == "tool_calls"
    for seed in range(4):
        named = {"type": "function", "function": {"name": "get_time"}}
        body = _chat(False, tool_choice=named, seed=seed)
        answer = await (await post("/v1/chat/completions", json=body)).json()
        assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_time"
    required = await post(
        "/v1/chat/completions", json=_chat(False, tools=None, tool_choice="required")
    )
    assert required.status == 400
    assert "Tools cannot be empty if tool choice is set to required." in await required.text()
    missing = {"type": "function", "function": {"name": "nope"}}
    unknown = await post("/v1/chat/completions", json=_chat(False, tool_choice=missing))
    assert unknown.status == 400 and "Tool 'nope' not found in tools list." in await unknown.text()


async def test_without_the_parser_the_call_is_content(sim_client_factory: SimClientFactory) -> None:
    """_tool_call_parsing_active is false without --tool-call-parser: the model's call is
    the answer's text, finish `stop`."""
    client = await sim_client_factory(itl=0.001)
    answer = await (await client.post("/v1/chat/completions", json=_chat(False))).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"] is None
    content = choice["message"]["content"]
    assert content.endswith("\n</tool_call>") and "<tool_call>\n{" in content
    required = await client.post("/v1/chat/completions", json=_chat(False, tool_choice="required"))
    assert required.status == 400 and "not supported by the simulator" in await required.text()


async def test_a_continuation_is_the_same_call(sim_client_factory: SimClientFactory) -> None:
    """The model is prefix-consistent through a call: an answer cut anywhere (inside the
    call too) and continued with continue_final_message ends as the original; with the
    parser on, a continuation from the text before the call makes the same call."""
    raw_client = await sim_client_factory(itl=0.001)
    whole = await (await raw_client.post("/v1/chat/completions", json=_chat(False))).json()
    full = whole["choices"][0]["message"]["content"]
    at = full.index("<tool_call>")
    for cut in sorted({at // 2, at, at + len("<tool_call>"), at + 20, len(full) - 5}):
        partial = full[:cut]
        messages = [*_chat()["messages"], {"role": "assistant", "content": partial}]
        body = _chat(False, messages=messages, continue_final_message=True)
        rest = await (await raw_client.post("/v1/chat/completions", json=body)).json()
        assert partial + rest["choices"][0]["message"]["content"] == full, cut

    parsed = await sim_client_factory(itl=0.001, tool_call_parser="qwen25")
    first = await (await parsed.post("/v1/chat/completions", json=_chat(False))).json()
    call = first["choices"][0]["message"]["tool_calls"][0]["function"]
    before = full[:at]
    messages = [*_chat()["messages"], {"role": "assistant", "content": before}]
    body = _chat(False, messages=messages, continue_final_message=True)
    again = await (await parsed.post("/v1/chat/completions", json=body)).json()
    assert again["choices"][0]["message"]["tool_calls"][0]["function"] == call


async def test_a_call_cut_by_max_tokens_is_closed_at_the_finish(
    sim_client_factory: SimClientFactory,
) -> None:
    """_check_for_unstreamed_tool_args: a length finish mid-arguments still sends what
    the partly parsed arguments lack, so the streamed arguments are one JSON object."""
    client = await sim_client_factory(itl=0.001, tool_call_parser="qwen25")
    whole = await (await client.post("/v1/chat/completions", json=_chat(False))).json()
    used = whole["usage"]["completion_tokens"]
    chunks = _chunks(
        await sim_read_sse(
            await client.post("/v1/chat/completions", json=_chat(max_tokens=used - 4))
        )
    )
    _, calls, finish = _calls(chunks)
    assert finish == "length" and calls
    json.loads("".join(c["function"]["arguments"] for c in calls))


async def test_reasoning_then_the_call(sim_client_factory: SimClientFactory) -> None:
    """Qwen3: reasoning deltas first, then the call (the reasoning parser ends the
    reasoning at `<tool_call>` too, Qwen3Detector's tool_start_token)."""
    client = await sim_client_factory(
        itl=0.001, reasoning_parser="qwen3", tool_call_parser="qwen25"
    )
    chunks = _chunks(await sim_read_sse(await client.post("/v1/chat/completions", json=_chat())))
    kinds = []
    for c in chunks:
        for choice in c["choices"]:
            d = choice["delta"]
            kinds += ["r"] if d.get("reasoning_content") else []
            kinds += ["t"] if d.get("tool_calls") else []
    assert kinds and kinds[0] == "r" and "t" in kinds
    assert kinds.index("t") > max(i for i, k in enumerate(kinds) if k == "r")
    assert _calls(chunks)[2] == "tool_calls"


def test_detector_quirks_kept_from_the_source() -> None:
    """BaseFormatDetector / Qwen25Detector: a split `<tool_call>` is held back; text in
    the buffer when `<tool_call>\\n` completes is dropped; an unknown tool resets and
    sends nothing; text after `\\n</tool_call>` stays in the buffer."""
    d = Detector(("f",))
    assert d.parse("Hi") == ("Hi", [])
    assert d.parse(" there <tool") == ("", [])  # could be the start of <tool_call>
    assert d.parse("_call>\n{") == ("", [])  # " there " is gone for good
    normal, calls = d.parse('"name": "f", "arguments": {"a": 1')
    assert normal == "" and [(c.name, c.parameters) for c in calls] == [("f", "")]
    normal, calls = d.parse("}}\n</tool_call>\nBye")
    assert [c.parameters for c in calls] == ['{"a": 1}']
    assert d.parse(" now") == ("", [])  # held after the call, never sent

    unknown = Detector(("f",))
    assert unknown.parse('<tool_call>\n{"name": "g", "arguments": {}}') == ("", [])
    assert (
        unknown.parse_whole('pre <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')[0]
        == "pre"
    )
