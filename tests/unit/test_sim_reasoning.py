"""The simulator's `--reasoning-parser` against SGLang 0.5.19 (paths `python/sglang/srt/`).

`parser/reasoning_parser.py` (`BaseReasoningFormatDetector`, `Qwen3Detector`,
`DeepSeekR1Detector`), `entrypoints/openai/serving_chat.py` (`_generate_stream_content`,
`_process_reasoning_stream`, `_build_chat_response`), `entrypoints/openai/sse_utils.py`
(`StreamDelta`), `managers/schedule_batch.py` (`Req.update_reasoning_tokens`).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ha_agent.sim.reasoning import Detector
from tests.unit.conftest import SimClientFactory, sim_read_sse

pytestmark = pytest.mark.timeout(30)


def _chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "think"}],
        "stream": stream,
        "seed": 1,
        "max_tokens": 40,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        **extra,
    }


def _chunks(payloads: list[str]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def _split(chunks: list[dict[str, Any]]) -> tuple[str, str, list[str]]:
    """(reasoning, content, the kind of each delta in order)."""
    thought, text, order = "", "", []
    for c in chunks:
        for choice in c["choices"]:
            d = choice["delta"]
            if d.get("reasoning_content"):
                thought += d["reasoning_content"]
                order.append("r")
            if d.get("content"):
                text += d["content"]
                order.append("c")
    return thought, text, order


@pytest.mark.parametrize("parser", ["qwen3", "deepseek-r1"])
async def test_reasoning_streams_first_then_content_as_sglang_splits_it(
    sim_client_factory: SimClientFactory, parser: str
) -> None:
    """_generate_stream_content: a reasoning chunk `{"reasoning_content": ...}` (StreamDelta
    omits role/content), then content chunks with `reasoning_content: null`; the
    non-stream answer splits the same text (parse_non_stream); reasoning_tokens counts
    up to and including `</think>` (update_reasoning_tokens)."""
    client = await sim_client_factory(itl=0.001, eos_rate=0.0, reasoning_parser=parser)
    chunks = _chunks(await sim_read_sse(await client.post("/v1/chat/completions", json=_chat())))
    thought, text, order = _split(chunks)
    assert thought and text and "<think>" not in thought + text and "</think>" not in text
    assert order == sorted(order, reverse=True)  # every reasoning delta before any content
    first_r = next(
        c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("reasoning_content")
    )
    assert set(first_r["choices"][0]["delta"]) == {"reasoning_content"}
    final = chunks[-1]["usage"]
    assert 0 < final["reasoning_tokens"] < final["completion_tokens"] == 40

    plain = await (await client.post("/v1/chat/completions", json=_chat(stream=False))).json()
    message = plain["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == (thought, text)
    assert plain["usage"]["reasoning_tokens"] == final["reasoning_tokens"]

    # /generate has no parser: the raw text holds the tags (Qwen3 writes <think> itself).
    raw = await client.post(
        "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 5}}
    )
    assert (await raw.json())["meta_info"]["completion_tokens"] == 5


async def test_continue_final_message_resumes_inside_or_after_the_reasoning(
    sim_client_factory: SimClientFactory,
) -> None:
    """ReasoningParser(continue_final_message): the final assistant content is
    previous_content; `<think>` in it starts the continuation in the reasoning,
    `</think>` after it. The simulated model continues that context exactly."""
    client = await sim_client_factory(itl=0.001, eos_rate=0.0, reasoning_parser="qwen3")
    whole = _chunks(await sim_read_sse(await client.post("/v1/chat/completions", json=_chat())))
    deltas = [c for c in whole if c["choices"] and c.get("usage")]
    thought, text, order = _split(whole)
    first_content = order.index("c")
    for k in (first_content // 2, first_content + 3):  # inside the reasoning, then after
        seen_thought, seen_text, _ = _split(deltas[:k])
        prefix = "<think>" + seen_thought + ("</think>" + seen_text if seen_text else "")
        used = deltas[k - 1]["usage"]["completion_tokens"]
        body = _chat(max_tokens=40 - used)
        body["messages"] = [*body["messages"], {"role": "assistant", "content": prefix}]
        body["continue_final_message"] = True
        resp = await client.post("/v1/chat/completions", json=body)
        rest = _chunks(await sim_read_sse(resp))
        got_thought, got_text, _ = _split(rest)
        assert (seen_thought + got_thought, seen_text + got_text) == (thought, text)
        assert rest[-1]["usage"]["completion_tokens"] == 40 - used


def test_detector_holds_back_a_split_end_tag_and_flushes_at_the_end() -> None:
    """BaseReasoningFormatDetector._parse_streaming_increment_impl and finish()."""
    d = Detector(force_reasoning=True, tool_start=None, previous=None)
    assert d.parse("<think>a b</th") == ("a b", "")
    assert d.parse("ink>c") == ("", "c")
    d = Detector(force_reasoning=True, tool_start=None, previous=None)
    assert d.parse("x </") == ("x ", "")
    assert d.finish() == ("</", "")
    assert Detector(False, None, "<think>y</think>z").parse_whole("more") == ("", "more")
    assert Detector(False, None, "<think>y").parse_whole("more</think>w") == ("more", "w")


async def test_without_the_parser_reasoning_content_stays_null(
    sim_client_factory: SimClientFactory,
) -> None:
    client = await sim_client_factory(itl=0.001)
    chunks = _chunks(await sim_read_sse(await client.post("/v1/chat/completions", json=_chat())))
    assert all(
        c["choices"][0]["delta"]["reasoning_content"] is None for c in chunks if c["choices"]
    )
    assert chunks[-1]["usage"]["reasoning_tokens"] == 0
