"""Reasoning streams migrate: the relay in front of two simulators run with SGLang's
`--reasoning-parser` (see test_sim_reasoning.py for how they follow SGLang 0.5.19).

The primary ends the stream with an engine abort (503, as SGLang's running timeout
or a KV-cache fault does, `srt/managers/tokenizer_manager.py`) after a given number of
tokens, inside the reasoning or inside the answer; the relay continues it on the
standby with `continue_final_message`. What the client checks: one stream — one role
chunk, every reasoning delta before any content, the same reasoning and content an
unbroken run gives, one finish, the usage (reasoning tokens included) of that run.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.gateway.stream.migration import REASONING_FORMATS, Migration, Progress
from ha_agent.gateway.stream.relay import Relay
from ha_agent.openapi.endpoints import CHAT
from tests.support.fakes import relay_over
from tests.unit.conftest import SIM_AUTH, SimClientFactory

pytestmark = pytest.mark.timeout(60)

BUDGET = 60


def body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "Why do leases need fencing?"}],
        "max_tokens": BUDGET,
        "seed": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


async def read(url: str, payload: dict[str, Any]) -> list[Any]:
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream("POST", url + "/v1/chat/completions", json=payload) as resp,
    ):
        assert resp.status_code == 200
        out: list[Any] = []
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def split(events: list[Any]) -> tuple[str, str, str]:
    """(reasoning, content, the order of delta kinds as a string of r and c)."""
    thought, text, order = "", "", ""
    for e in events:
        if not isinstance(e, dict) or not e.get("choices"):
            continue
        delta = e["choices"][0]["delta"]
        if delta.get("reasoning_content"):
            thought += delta["reasoning_content"]
            order += "r"
        if delta.get("content"):
            text += delta["content"]
            order += "c"
    return thought, text, order


class Pair:
    def __init__(self, primary: TestClient, standby: TestClient, relay: Relay, url: str) -> None:
        self.primary, self.standby, self.relay, self.url = primary, standby, relay, url

    def migrations(self, outcome: str) -> float:
        return self.relay.metrics.migrations.labels(CHAT, outcome)._value.get()

    def engine_url(self, client: TestClient) -> str:
        return f"http://127.0.0.1:{client.server.port}"


@pytest.fixture
async def pair_factory(sim_client_factory: SimClientFactory) -> AsyncIterator[Any]:
    servers: list[TestServer] = []
    relays: list[Relay] = []

    async def make(parser: str, relay_parser: str) -> Pair:
        sims = [
            await sim_client_factory(eos_rate=0.0, itl=0.002, reasoning_parser=parser)
            for _ in range(2)
        ]
        relay = relay_over(
            [f"http://127.0.0.1:{s.server.port}" for s in sims], reasoning_parser=relay_parser
        )
        relays.append(relay)
        server = TestServer(relay.app())
        await server.start_server()
        servers.append(server)
        return Pair(sims[0], sims[1], relay, f"http://127.0.0.1:{server.port}")

    yield make
    for relay in relays:
        await relay.transport.close()
    for server in servers:
        await server.close()


async def abort_after(sim: TestClient, tokens: int) -> None:
    r = await sim.post(
        "/sim/faults",
        json={"abort_after_tokens": tokens, "abort_cause": "retract_host_pool"},
        headers=SIM_AUTH,
    )
    assert r.status == 200


@pytest.mark.parametrize("parser", ["qwen3", "deepseek-r1"])
async def test_a_reasoning_stream_migrates_inside_and_after_the_reasoning(
    pair_factory: Any, parser: str
) -> None:
    pair = await pair_factory(parser, parser)
    want = await read(pair.engine_url(pair.standby), body())
    thought, text, order = split(want)
    assert thought and text
    reasoning_tokens = want[-2]["usage"]["reasoning_tokens"]
    assert 2 < reasoning_tokens < BUDGET
    for n, cut in enumerate((reasoning_tokens // 2, reasoning_tokens + 5)):  # inside, after
        await abort_after(pair.primary, cut)
        got = await read(pair.url, body())
        assert not [e for e in got if isinstance(e, dict) and "error" in e]
        assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
        assert split(got) == (thought, text, order), f"cut after {cut} tokens"
        roles = [e for e in got[:-1] if e["choices"] and e["choices"][0]["delta"].get("role")]
        finishes = [e["choices"][0]["finish_reason"] for e in got[:-1] if e["choices"]]
        assert len(roles) == 1 and [f for f in finishes if f] == ["length"]
        usage, expected = got[-2]["usage"], want[-2]["usage"]
        for key in ("prompt_tokens", "completion_tokens", "total_tokens", "reasoning_tokens"):
            assert usage[key] == expected[key], (key, cut)
        assert len({e["id"] for e in got[:-1]}) == 1
        assert pair.migrations("migrated") == n + 1


async def test_without_the_parser_configured_a_reasoning_stream_is_refused(
    pair_factory: Any,
) -> None:
    pair = await pair_factory("qwen3", "")
    await abort_after(pair.primary, 3)
    got = await read(pair.url, body())
    assert got[-1] == "[DONE]"
    error = got[-2]["error"]
    assert "retry the request" in error["message"] and "reasoning parser" in error["message"]
    assert pair.migrations("refused") == 1


def test_the_continuation_is_the_models_own_text() -> None:
    """What the standby is asked to continue (serving_chat.py _handle_last_assistant_message
    takes the content; ReasoningParser takes it as previous_content)."""
    qwen, r1 = REASONING_FORMATS["qwen3"], REASONING_FORMATS["deepseek-r1"]
    mid = Progress(reasoning="\nLet me see", text="")
    after = Progress(reasoning="\nok", text="The answer", reasoning_over=True)
    plain: dict[str, Any] = {}
    assert qwen.text(plain, mid) == "<think>\nLet me see"
    assert qwen.text(plain, after) == "<think>\nok</think>The answer"
    assert r1.text(plain, mid) == "\nLet me see"
    assert r1.text(plain, after) == "\nok</think>The answer"
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    assert qwen.text(off, Progress(text="Hi")) == "Hi"
    raw = {"separate_reasoning": False}  # the engine streams the tags as content
    assert qwen.text(raw, Progress(text="<think>a</think>b")) == "<think>a</think>b"
    closed_at_once = Progress(text="Hi")  # Qwen3 wrote <think></think> before the answer
    assert qwen.text(plain, closed_at_once) == "<think></think>Hi"
    assert r1.text(plain, closed_at_once) == "</think>Hi"


def test_a_tool_call_delta_without_a_point_before_it_is_refused() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    mig = Migration(CHAT, body(tools=tools))
    mig.progress.text = "Let me check."
    assert mig.refusal() is None
    mig.progress.tool_calls = True
    assert mig.refusal() == "a tool call in flight cannot be resumed"


async def test_reasoning_left_in_the_content_migrates_as_text(pair_factory: Any) -> None:
    """`separate_reasoning: false` (serving_chat.py): no parser runs, the tags stream as
    content, and that content is the model's text as it is."""
    pair = await pair_factory("qwen3", "qwen3")
    want = await read(pair.engine_url(pair.standby), body(separate_reasoning=False))
    _, text, order = split(want)
    assert text.startswith("<think>") and set(order) == {"c"}
    await abort_after(pair.primary, 6)
    got = await read(pair.url, body(separate_reasoning=False))
    assert split(got) == ("", text, order)
    assert got[-2]["usage"]["completion_tokens"] == want[-2]["usage"]["completion_tokens"]
    assert pair.migrations("migrated") == 1
