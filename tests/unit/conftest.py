"""Shared fixtures. Simulator fixtures are prefixed ``sim_``."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.config import SimSettings
from ha_agent.sim import create_app
from tests.support.fakes import FakeClock, FakeStore

# Tiny latencies: the whole simulator suite must stay well under a minute.
SIM_FAST: dict[str, Any] = {
    "startup_delay": 0.0,
    "ttft_base": 0.001,
    "prefill_per_token": 0.0,
    "itl": 0.001,
    "concurrency_slowdown": 0.0,
    "disconnect_abort_delay": 0.0,
    "drain_timeout": 0.0,
    "health_check_interval": 0.01,  # SGLang looks every 1 s
    "admin_token": "sim-test-token",  # /sim/faults is closed without one
}
SIM_AUTH = {"Authorization": "Bearer sim-test-token"}

SimClientFactory = Callable[..., Awaitable[TestClient]]


def make_sim_settings(**overrides: Any) -> SimSettings:
    return SimSettings(**{**SIM_FAST, **overrides})


@pytest.fixture
def sim_env_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SIM_* variable from the outer environment leaks into a test's settings."""
    for key in list(os.environ):
        if key.startswith("SIM_"):
            monkeypatch.delenv(key)


@pytest.fixture
async def sim_client_factory(sim_env_clean: None) -> AsyncIterator[SimClientFactory]:
    """Start in-process simulators: ``await sim_client_factory(itl=0.01, ...)``."""
    clients: list[TestClient] = []

    async def make(**overrides: Any) -> TestClient:
        # The fault knobs' token on every request; a test's own header replaces it.
        client = TestClient(
            TestServer(create_app(make_sim_settings(**overrides))), headers=SIM_AUTH
        )
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await asyncio.wait_for(client.close(), timeout=10)


@pytest.fixture
async def sim_client(sim_client_factory: SimClientFactory) -> TestClient:
    return await sim_client_factory()


async def sim_read_sse(resp: ClientResponse) -> list[str]:
    """The ``data:`` payloads of a complete SSE body, checking SGLang's exact framing."""
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await asyncio.wait_for(resp.text(), timeout=10)
    assert raw.endswith("\n\n"), raw[-50:]
    events = raw[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [e[len("data: ") :] for e in events]


def sim_json_events(payloads: list[str]) -> list[dict[str, Any]]:
    """All events but the final ``[DONE]`` (asserted to be last and unique), parsed."""
    assert payloads.count("[DONE]") == 1 and payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def sim_word_prefix(text: str, k: int) -> str:
    """The text of the first k generated tokens (each is one space-prefixed word)."""
    words = text.split(" ")[1:]
    assert len(words) >= k and text.startswith(" ")
    return "".join(" " + w for w in words[:k])


async def sim_metric(client: TestClient, name: str, **labels: str) -> float:
    """A metric summed over its label sets (``labels`` narrows them, e.g. mode="decode")."""
    resp = await client.get("/metrics")
    text = await resp.text()
    # A declared family with no sample yet (as SGLang: a counter's label set appears
    # at its first increment) reads 0.
    total, seen = 0.0, f"# TYPE {name} " in text or f"# TYPE {name.removesuffix('_total')} " in text
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    if not seen:
        raise AssertionError(f"metric {name} not exported")
    return total


async def sim_live_state(client: TestClient) -> dict[str, Any]:
    """The scheduler's live counts (/server_info internal_states), not the gauges."""
    info = await (await client.get("/server_info")).json()
    state: dict[str, Any] = info["internal_states"][0]
    return state


async def sim_wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.01
) -> None:
    """Poll an async condition until true; fail after ``timeout`` (never wait unbounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met within timeout")
        await asyncio.sleep(interval)


@pytest.fixture
def clock() -> FakeClock:
    """A clock the test moves by hand (the HA loop's and the topology's)."""
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> FakeStore:
    """An in-memory lease store on that clock."""
    return FakeStore(clock)
