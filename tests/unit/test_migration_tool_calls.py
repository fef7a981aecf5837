"""Tool-call streams through the relay, in front of two simulators run with SGLang's
`--tool-call-parser qwen25` (test_sim_tool_calls.py: how they follow SGLang 0.5.19).

Why it works as it does (serving_chat.py, function_call/base_format_detector.py):
each request gets a fresh `FunctionCallParser` (`_process_tool_call_stream`), and its
detector only parses a call whose `<tool_call>\\n` is in its own output buffer; the
argument fragments it sends are diffs of re-serialised partial JSON, behind the engine's
token count. So a stream that broke inside a call resumes from the text before the call:
the standby writes the call again and its parser streams it as a call; the relay sends
on only what the client lacks. Where that cannot be exact it ends the stream with its
retryable error and does not pretend.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.gateway.stream.migration import ContinuationDiverged, Migration
from ha_agent.gateway.stream.relay import Relay
from ha_agent.openapi.endpoints import CHAT
from tests.support.fakes import relay_over
from tests.unit.conftest import SIM_AUTH, SimClientFactory

pytestmark = pytest.mark.timeout(60)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"topic": {"type": "string"}, "depth": {"type": "integer"}},
                "required": ["topic", "depth"],
            },
        },
    }
]


def body(seed: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Why do leases need fencing?"}],
        "tools": TOOLS,
        "max_tokens": 80,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def read(url: str, payload: dict[str, Any]) -> tuple[list[bytes], list[Any]]:
    """(the raw events, parsed)."""
    raw: list[bytes] = []
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream("POST", url + "/v1/chat/completions", json=payload) as resp,
    ):
        assert resp.status_code == 200
        buffer = b""
        async for piece in resp.aiter_bytes():
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            raw += events
    parsed = [
        e[6:].decode() if e == b"data: [DONE]" else json.loads(e[6:])
        for e in raw
        if e.startswith(b"data: ")
    ]
    return raw, parsed


def answer(events: list[Any]) -> tuple[str, list[tuple[str | None, str]], list[str]]:
    """(content, each call's (name, arguments), the finish reasons)."""
    text, calls, finishes = "", [], []
    for e in events:
        if not isinstance(e, dict) or not e.get("choices"):
            continue
        choice = e["choices"][0]
        text += choice["delta"].get("content") or ""
        for call in choice["delta"].get("tool_calls") or []:
            if call["function"]["name"]:
                calls.append((call["function"]["name"], ""))
            name, args = calls[call["index"]]
            calls[call["index"]] = (name, args + call["function"]["arguments"])
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    return text, calls, finishes


class Pair:
    def __init__(self, primary: TestClient, standby: TestClient, relay: Relay, url: str) -> None:
        self.primary, self.standby, self.relay, self.url = primary, standby, relay, url

    def migrations(self, outcome: str) -> float:
        return self.relay.metrics.migrations.labels(CHAT, outcome)._value.get()

    def engine_url(self, client: TestClient) -> str:
        return f"http://127.0.0.1:{client.server.port}"


@pytest.fixture
async def pair(sim_client_factory: SimClientFactory) -> AsyncIterator[Pair]:
    sims = [await sim_client_factory(itl=0.002, tool_call_parser="qwen25") for _ in range(2)]
    relay = relay_over([f"http://127.0.0.1:{s.server.port}" for s in sims])
    server = TestServer(relay.app())
    await server.start_server()
    yield Pair(sims[0], sims[1], relay, f"http://127.0.0.1:{server.port}")
    await relay.transport.close()
    await server.close()


async def abort_after(sim: TestClient, tokens: int) -> None:
    r = await sim.post(
        "/sim/faults",
        json={"abort_after_tokens": tokens, "abort_cause": "retract_host_pool"},
        headers=SIM_AUTH,
    )
    assert r.status == 200


async def _seed_with_words_first(pair: Pair, words: int) -> tuple[int, list[Any]]:
    """A seed whose answer has at least `words` words before its call (the model's
    choice, deterministic per seed)."""
    for seed in range(40):
        _, want = await read(pair.engine_url(pair.standby), body(seed))
        if len(answer(want)[0].split()) >= words:
            return seed, want
    raise AssertionError("no seed with words before the call")


async def test_a_stream_still_in_text_moves_and_the_standby_makes_the_call(pair: Pair) -> None:
    """Cut inside the words before the call, and right after `<tool_call>` (held by the
    parser as a possible start, nothing sent): one stream, the unbroken run's content,
    call and usage; finish `tool_calls`; the relay's running usage cut off as SGLang
    would send the chunk (`"usage":null` on the parser's pydantic-dumped chunks)."""
    seed, want = await _seed_with_words_first(pair, 3)
    text, calls, _ = answer(want)
    words = len(text.split())
    for n, cut in enumerate((words - 1, words + 1)):
        await abort_after(pair.primary, cut)
        raw, got = await read(pair.url, body(seed))
        assert not [e for e in got if isinstance(e, dict) and "error" in e], got
        assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
        assert answer(got) == (text, calls, ["tool_calls"]), f"cut after {cut} tokens"
        roles = [e for e in got[:-1] if e["choices"] and e["choices"][0]["delta"].get("role")]
        assert len(roles) == 1
        usage, expected = got[-2]["usage"], want[-2]["usage"]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert usage[key] == expected[key], (key, cut)
        for event in raw:
            if b'"tool_calls":' in event:
                assert event.endswith(b',"usage":null}'), event
        assert pair.migrations("migrated") == n + 1
    assert pair.migrations("refused") == 0


def call_ids(events: list[Any]) -> list[str]:
    """The ids the client was given, one per call item that carried one."""
    return [
        call["id"]
        for e in events
        if isinstance(e, dict) and e.get("choices")
        for call in e["choices"][0]["delta"].get("tool_calls") or []
        if call["id"] is not None
    ]


def assert_one_stream(raw: list[bytes], got: list[Any], want: list[Any], cut: int) -> None:
    """The client's stream is the unbroken answer: the same content and call (one
    name chunk, one id), finish `tool_calls` once, one role chunk, the same usage, and
    every tool-call chunk as SGLang dumps it."""
    assert not [e for e in got if isinstance(e, dict) and "error" in e], (cut, got)
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    assert answer(got) == (*answer(want)[:2], ["tool_calls"]), f"cut after {cut} tokens"
    assert len(call_ids(got)) == len(answer(want)[1]) == 1, cut
    roles = [e for e in got[:-1] if e["choices"] and e["choices"][0]["delta"].get("role")]
    assert len(roles) == 1
    usage, expected = got[-2]["usage"], want[-2]["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[key] == expected[key], (key, cut)
    for event in raw:
        if b'"tool_calls":' in event:
            assert event.endswith(b',"usage":null}'), event


async def test_a_stream_with_a_call_under_way_moves_and_keeps_the_call(pair: Pair) -> None:
    """Cut inside the call's arguments: the standby writes the call again from the text
    before it; the client gets only the argument fragments it lacks, under the id the
    first node gave the call."""
    seed, want = await _seed_with_words_first(pair, 1)
    words = len(answer(want)[0].split())
    await abort_after(pair.primary, words + 12)  # inside the call's arguments
    raw, got = await read(pair.url, body(seed))
    assert_one_stream(raw, got, want, words + 12)
    assert pair.migrations("migrated") == 1 and pair.migrations("refused") == 0


async def test_a_break_at_every_token_moves_with_the_unbroken_call(pair: Pair) -> None:
    """Every cut point of one answer, before the call, inside it and after its last
    argument: each moves, and the client's stream is the unbroken one."""
    seed, want = await _seed_with_words_first(pair, 2)
    total = want[-2]["usage"]["completion_tokens"]
    # The engine's count at the call's first delta: every cut from there on breaks a
    # stream whose client already has part of the call.
    _, counted = await read(
        pair.engine_url(pair.standby),
        body(seed, stream_options={"include_usage": True, "continuous_usage_stats": True}),
    )
    call_at = next(
        e["usage"]["completion_tokens"]
        for e in counted
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("tool_calls")
    )
    assert total - call_at >= 20, "most cut points fall inside the call"
    for cut in range(1, total):
        await abort_after(pair.primary, cut)
        raw, got = await read(pair.url, body(seed))
        assert_one_stream(raw, got, want, cut)
    assert pair.migrations("migrated") == total - 1
    assert pair.migrations("refused") == 0


def _chunk(delta: dict[str, Any], done: int | None, finish: str | None = None) -> bytes:
    event: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if done is not None:
        event["usage"] = {"prompt_tokens": 9, "completion_tokens": done, "total_tokens": 9 + done}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _call(name: str | None, args: str, call_id: str | None = None) -> dict[str, Any]:
    fn = {"name": name, "arguments": args}
    return {"tool_calls": [{"id": call_id, "index": 0, "type": "function", "function": fn}]}


def _broken(text_count: int, call_count: int) -> Migration:
    """A first segment that broke inside a call: role, "Hi" (engine count
    `text_count`), the call's name (`call_count`), then `{"topic": "le`."""
    mig = Migration(CHAT, body(1))
    mig.absorb_first_segment(
        _chunk({"role": "assistant", "content": ""}, None)
        + _chunk({"content": "Hi"}, text_count)
        + _chunk(_call("lookup", "", "call_a"), call_count)
        + _chunk(_call(None, '{"topic": "le'), call_count + 5)
    )
    return mig


def test_a_call_that_began_in_the_output_of_the_text_before_it_is_refused() -> None:
    """The engine's count at the text covers the call's first tokens too when both came
    out of one engine output (one count on both chunks): no point to resume from with
    an exact count, so the stream ends with the retryable error."""
    assert _broken(2, 6).refusal() is None
    reason = _broken(6, 6).refusal()
    assert reason is not None and reason.startswith(
        "a tool call in flight cannot be resumed: the call began"
    )


def test_the_continuation_resumes_before_the_call_and_sends_only_what_is_new() -> None:
    mig = _broken(2, 6)
    cont = mig.continuation()
    assert cont is not None
    assert cont["messages"][-1] == {"role": "assistant", "content": "Hi"}
    assert cont["max_tokens"] == 80 - 2  # the budget from the text, the call again
    mig.start_segment()
    out, abort = mig.rewrite(
        _chunk({"role": "assistant", "content": ""}, None)
        + _chunk(_call("lookup", "", "call_b"), 4)
        + _chunk(_call(None, '{"topic": "l'), 8)
        + _chunk(_call(None, "eas"), 9)
        + _chunk(_call(None, 'e"}'), 10)
        + _chunk({}, 11, finish="tool_calls")
    )
    assert abort is None
    sent = [json.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert [e["choices"][0]["delta"].get("tool_calls") for e in sent] == [
        [
            {
                "id": None,
                "index": 0,
                "type": "function",
                "function": {"name": None, "arguments": "as"},
            }
        ],
        [
            {
                "id": None,
                "index": 0,
                "type": "function",
                "function": {"name": None, "arguments": 'e"}'},
            }
        ],
        None,
    ]
    assert sent[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert mig.progress.calls[0].arguments == '{"topic": "lease"}'
    assert mig.progress.calls[0].id == "call_a"
    assert mig.progress.tokens == 2 + 11


@pytest.mark.parametrize(
    "segment",
    [
        _chunk(_call("search", "", "call_b"), 4),  # another tool
        _chunk(_call("lookup", "", "call_b"), 4) + _chunk(_call(None, '{"topic": "x'), 8),
        _chunk({"content": "Sorry"}, 3),  # text where the call was
        _chunk(_call("lookup", "", "call_b"), 4) + _chunk({}, 5, finish="stop"),  # short
    ],
)
def test_a_continuation_that_writes_another_call_is_no_continuation(segment: bytes) -> None:
    mig = _broken(2, 6)
    assert mig.continuation() is not None
    mig.start_segment()
    with pytest.raises(ContinuationDiverged):
        mig.rewrite(segment)


@pytest.mark.parametrize("seed", [0, 2])  # the call right after </think>; words between
async def test_a_break_at_every_token_of_reasoning_then_a_call_moves(
    sim_client_factory: SimClientFactory, seed: int
) -> None:
    """With `--reasoning-parser qwen3` too (the relay told): the answer resumes from
    the reasoning and text before the call, rebuilt as the model wrote them; every cut
    point gives the unbroken reasoning, call, finish and usage (reasoning tokens too)."""
    sims = [
        await sim_client_factory(itl=0.002, tool_call_parser="qwen25", reasoning_parser="qwen3")
        for _ in range(2)
    ]
    relay = relay_over(
        [f"http://127.0.0.1:{s.server.port}" for s in sims], reasoning_parser="qwen3"
    )
    server = TestServer(relay.app())
    await server.start_server()
    pair = Pair(sims[0], sims[1], relay, f"http://127.0.0.1:{server.port}")
    try:
        _, want = await read(pair.engine_url(pair.standby), body(seed, max_tokens=160))
        thought = "".join(
            e["choices"][0]["delta"].get("reasoning_content") or ""
            for e in want
            if isinstance(e, dict) and e.get("choices")
        )
        assert thought and answer(want)[1], "reasoning, then a call"
        total = want[-2]["usage"]["completion_tokens"]
        for cut in range(1, total):
            await abort_after(pair.primary, cut)
            raw, got = await read(pair.url, body(seed, max_tokens=160))
            assert_one_stream(raw, got, want, cut)
            assert got[-2]["usage"]["reasoning_tokens"] == want[-2]["usage"]["reasoning_tokens"]
            assert [
                e for e in got if isinstance(e, dict) and e.get("choices")
            ] and thought == "".join(
                e["choices"][0]["delta"].get("reasoning_content") or ""
                for e in got
                if isinstance(e, dict) and e.get("choices")
            ), cut
        assert pair.migrations("migrated") == total - 1
    finally:
        await relay.transport.close()
        await server.close()


def test_a_replay_that_broke_before_sending_anything_starts_over_elsewhere() -> None:
    """The relay re-sends a continuation that gave the client nothing (relay.py): what
    the failed try replayed is forgotten, so the next try is cut the same way."""
    mig = _broken(2, 6)
    mig.start_segment()
    out, _ = mig.rewrite(_chunk(_call("lookup", "", "call_b"), 4) + _chunk(_call(None, '{"t'), 6))
    assert out == b""
    mig.retry_segment()
    out, _ = mig.rewrite(
        _chunk(_call("lookup", "", "call_c"), 4) + _chunk(_call(None, '{"topic": "lease"}'), 10)
    )
    sent = [json.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert [e["choices"][0]["delta"]["tool_calls"][0]["function"] for e in sent] == [
        {"name": None, "arguments": 'ase"}'}
    ]
    assert mig.progress.calls[0].arguments == '{"topic": "lease"}'
    assert mig.progress.tokens == 2 + 10
