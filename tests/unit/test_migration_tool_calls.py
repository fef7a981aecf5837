"""Tool-call streams through the relay, in front of two simulators run with SGLang's
`--tool-call-parser qwen25` (test_sim_tool_calls.py: how they follow SGLang 0.5.19).

Why the line is where it is (serving_chat.py, function_call/base_format_detector.py):
each request gets a fresh `FunctionCallParser` (`_process_tool_call_stream`), and its
detector only parses a call whose `<tool_call>\\n` is in its own output buffer; the
continuation's prompt (`continue_final_message`, the content the client has) never is.
So before the first `tool_calls` delta the client has text only and the standby, given
that text, writes the call itself: the stream moves. After it, the standby's parser
could not see the call it would have to finish: the relay ends the stream with its
retryable error and does not re-send it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

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


async def test_a_stream_with_a_call_under_way_ends_with_the_retryable_error(pair: Pair) -> None:
    seed, want = await _seed_with_words_first(pair, 1)
    words = len(answer(want)[0].split())
    await abort_after(pair.primary, words + 12)  # inside the call's arguments
    _, got = await read(pair.url, body(seed))
    assert got[-1] == "[DONE]"
    assert answer(got)[1], "the client had the call's first delta"
    error = got[-2]["error"]["message"]
    assert "retry the request" in error and "tool call" in error
    assert pair.migrations("refused") == 1 and pair.migrations("migrated") == 0


async def test_a_break_at_every_token_moves_exactly_when_no_call_delta_was_sent(
    pair: Pair,
) -> None:
    """Every cut point of one answer: a break before the first tool_calls delta moves
    (the client's answer is the unbroken one), a later one is refused; never anything
    else."""
    seed, want = await _seed_with_words_first(pair, 2)
    expected = answer(want)
    total = want[-2]["usage"]["completion_tokens"]
    outcomes = []
    for cut in range(1, total):
        await abort_after(pair.primary, cut)
        _, got = await read(pair.url, body(seed))
        errors = [e["error"]["message"] for e in got if isinstance(e, dict) and "error" in e]
        if errors:
            assert "tool call" in errors[0] and answer(got)[1], (cut, errors)
            outcomes.append("refused")
        else:
            assert answer(got) == (*expected[:2], ["tool_calls"]), cut
            outcomes.append("moved")
    first_refused = outcomes.index("refused")
    assert outcomes == ["moved"] * first_refused + ["refused"] * (len(outcomes) - first_refused)
    # The words, `<tool_call>`, "\n" and the call's opening up to its complete name move.
    assert first_refused > len(expected[0].split()) + 2
    assert pair.migrations("migrated") == first_refused
