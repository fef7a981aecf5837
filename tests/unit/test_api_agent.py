"""The agent's REST API in-process: 4xx for bad input, a token for every admin route.

The agent is real (Ha, AgentApi, TokenAuth) on the in-memory store and engine of
tests/support/fakes.py; requests go through aiohttp's test client or a raw socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.auth import TokenAuth
from ha_agent.config import AgentSettings
from ha_agent.dcs.base import EngineState, Member
from ha_agent.events import EventLog
from ha_agent.node.api import AgentApi
from ha_agent.node.ha import Ha
from ha_agent.node.metrics import AgentMetrics
from ha_agent.openapi.agent import AGENT_SPEC
from tests.support.fakes import FakeClock, FakeEngine, FakePeers, FakeStore, agent_status

TOKEN = "s3cret-admin-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def get_ok(client: TestClient, path: str) -> Any:
    """GET `path`: it answers 200; its JSON body."""
    r = await client.get(path)
    assert r.status == 200, await r.text()
    return await r.json()


@dataclass
class AgentFixture:
    api: AgentApi
    ha: Ha
    store: FakeStore
    metrics: AgentMetrics


def make_agent(token: str | None = TOKEN) -> AgentFixture:
    """A primary agent (epoch 1) whose peer never answers: admin actions end in 4xx
    or 2xx at once, never in a wait for a hand-over."""
    clock = FakeClock()
    store = FakeStore(clock)
    settings = AgentSettings(
        node_name="sglang-01",
        advertise_engine_url="http://sglang-01:30000",
        advertise_api_url="http://sglang-01:8008",
        peers=["http://sglang-02:8008"],
        redis_url="redis://unused",
    )
    events = EventLog(None, "sglang-01")
    ha = Ha(settings, store, FakeEngine(clock), events, FakePeers(), clock=clock)  # type: ignore[arg-type]
    metrics = AgentMetrics()  # not attached to ha: the API only needs its registry
    api = AgentApi(ha, metrics, TokenAuth(token, metrics.auth_rejected))
    return AgentFixture(api, ha, store, metrics)


@pytest.fixture
async def agent() -> AgentFixture:
    a = make_agent()
    assert await a.ha.run_cycle() == "promoted to primary (epoch 1): no leader was present"
    return a


@pytest.fixture
async def client(agent: AgentFixture) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(agent.api.app())) as c:
        yield c


def admin_routes(app: web.Application) -> list[tuple[str, str]]:
    return sorted(
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("GET", "HEAD") and route.resource is not None
    )


def rejected(metrics: AgentMetrics, route: str) -> float:
    value = metrics.registry.get_sample_value(
        "sglang_ha_agent_auth_rejected_total", {"endpoint": route}
    )
    return value or 0.0


# -- authentication ----------------------------------------------------------------------


async def test_every_state_changing_route_needs_the_token(
    client: TestClient, agent: AgentFixture, caplog: pytest.LogCaptureFixture
) -> None:
    routes = admin_routes(agent.api.app())
    assert ("POST", "/ha/negotiate") in routes and ("POST", "/ha/failsafe") in routes
    caplog.set_level(logging.WARNING, logger="ha_agent.auth")
    for method, path in routes:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": f"Bearer {TOKEN[:-1]}"},
        ):
            r = await client.request(method, path, headers=headers, json={"to": "sglang-02"})
            assert r.status == 401, (method, path, headers)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert (await r.json())["detail"] == "missing or wrong admin token"
        assert rejected(agent.metrics, path) == 5, path
    # Nothing was done: still primary, not paused.
    assert agent.ha.is_primary() and not agent.store.paused
    metrics = await (await client.get("/metrics")).text()
    assert TOKEN not in metrics and TOKEN not in caplog.text
    assert "rejected admin request" in caplog.text


async def test_the_right_token_is_accepted(client: TestClient, agent: AgentFixture) -> None:
    r = await client.post("/ha/pause", headers={"Authorization": f"bearer  {TOKEN} "})
    assert r.status == 200 and (await r.json()) == {"paused": True}
    assert agent.store.paused
    r = await client.post("/ha/resume", headers=AUTH)
    assert r.status == 200 and not agent.store.paused


async def test_no_configured_token_disables_admin_routes() -> None:
    a = make_agent(token=None)
    async with TestClient(TestServer(a.api.app())) as c:
        for method, path in admin_routes(a.api.app()):
            r = await c.request(method, path, headers={"Authorization": "Bearer "})
            assert r.status == 403, path
        assert not a.store.paused


async def test_a_token_that_is_not_utf8_is_a_401_not_a_crash(
    client: TestClient, agent: AgentFixture
) -> None:
    """Raw bytes in the header (what a fuzzer or a broken client sends)."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(
        b"POST /ha/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Authorization: Bearer \xff\xfe\xc3(" + TOKEN.encode() + b"\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.read(200), timeout=5)
    writer.close()
    assert head.startswith((b"HTTP/1.1 401", b"HTTP/1.1 400")), head
    assert not agent.store.paused


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{broken", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b'{"to": "sglang-02", "force": NaN}', "not valid JSON"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b'{"to": 5, "force": true}', "'to' must be a non-empty string"),
        (b'{"to": "", "force": true}', "'to' must be a non-empty string"),
        (b'{"to": "sglang-02", "force": "yes"}', "confirm with"),
        (b'{"to": "sglang-02"}', "confirm with"),
    ],
)
async def test_malformed_failover_bodies_get_a_400_with_the_reason(
    client: TestClient, agent: AgentFixture, body: bytes, words: str
) -> None:
    r = await client.post(
        "/ha/failover", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status == 400, await r.text()
    assert words in (await r.json())["detail"]
    assert agent.ha.is_primary() and agent.store.switchover is None


# -- switchover and failover: who may take over ------------------------------------------


async def with_peer(agent: AgentFixture, engine: EngineState) -> str:
    """sglang-02 registered, its agent answering with an engine in state `engine`."""
    peer = Member("sglang-02", "http://sglang-02:30000", "http://sglang-02:8008")
    await agent.store.register(peer, ttl=60)
    agent.ha.peers.statuses[peer.api_url] = agent_status("sglang-02", engine=engine)  # type: ignore[attr-defined]
    return peer.name


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"to": "sglang-01"}, 409, "already the primary"),
        ({"to": "nobody"}, 404, "unknown node"),
        ({"to": "sglang-02"}, 412, "sglang-02 is not healthy"),
        ({}, 412, "any standby is not healthy"),
    ],
)
async def test_switchover_is_refused_unless_a_healthy_node_can_take_over(
    client: TestClient, agent: AgentFixture, body: dict[str, str], status: int, words: str
) -> None:
    await with_peer(agent, EngineState.HUNG)
    r = await client.post("/ha/switchover", json=body, headers=AUTH)
    assert r.status == status, await r.text()
    assert words in (await r.json())["detail"]
    assert agent.store.switchover is None and agent.ha.is_primary()


async def test_switchover_to_a_healthy_standby_is_requested_and_carried_out(
    client: TestClient, agent: AgentFixture
) -> None:
    await with_peer(agent, EngineState.HEALTHY)
    r = await client.post("/ha/switchover?wait=false", json={}, headers=AUTH)
    assert r.status == 202, await r.text()
    assert (await r.json())["to"] == "sglang-02"
    assert agent.store.switchover is not None and agent.store.switchover.to_node == "sglang-02"
    # The primary's next cycle hands the lease over to the node the API chose.
    assert "planned switchover to sglang-02" in await agent.ha.run_cycle()
    assert not agent.ha.is_primary()


async def test_switchover_without_a_primary_says_to_fail_over(
    client: TestClient, agent: AgentFixture
) -> None:
    await with_peer(agent, EngineState.HEALTHY)
    agent.store.leader = None
    r = await client.post("/ha/switchover", json={"to": "sglang-02"}, headers=AUTH)
    assert r.status == 409 and "use failover" in (await r.json())["detail"]


async def test_forced_failover_needs_a_known_healthy_target(
    client: TestClient, agent: AgentFixture
) -> None:
    await with_peer(agent, EngineState.DEAD)
    body = {"to": "nobody", "force": True}
    r = await client.post("/ha/failover", json=body, headers=AUTH)
    assert r.status == 404
    r = await client.post("/ha/failover", json={**body, "to": "sglang-02"}, headers=AUTH)
    assert r.status == 412 and "sglang-02 is not healthy" in (await r.json())["detail"]
    assert agent.store.leader is not None, "a refused failover leaves the lease alone"


async def test_forced_failover_drops_the_lease_for_the_target(
    client: TestClient, agent: AgentFixture
) -> None:
    await with_peer(agent, EngineState.HEALTHY)
    body = {"to": "sglang-02", "force": True}
    request = asyncio.ensure_future(client.post("/ha/failover", json=body, headers=AUTH))
    for _ in range(100):  # the lease is dropped, under a bumped epoch
        if agent.store.leader is None:
            break
        await asyncio.sleep(0.01)
    assert agent.store.leader is None and agent.store.epoch == 2
    assert agent.store.switchover is not None and agent.store.switchover.to_node == "sglang-02"
    # The target's agent takes the free lease; the admin's request sees it and says done.
    assert await agent.store.acquire("sglang-02", ttl=5, min_epoch=2) == 3
    r = await asyncio.wait_for(request, timeout=5)
    assert r.status == 200, await r.text()
    assert (await r.json())["detail"] == "forced failover from sglang-01 to sglang-02"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/ha/failsafe", {"leader": "sglang-02", "epoch": "1"}),
        ("/ha/failsafe", {"leader": "sglang-02", "epoch": True}),
        ("/ha/failsafe", {"leader": ["x"], "epoch": 1}),
        ("/ha/negotiate", {"node": "sglang-02", "epoch": 1.5}),
        ("/ha/negotiate", {"node": None, "epoch": 1}),
        ("/ha/switchover", {"to": {"name": "sglang-02"}}),
    ],
)
async def test_wrong_types_get_a_400(client: TestClient, path: str, body: object) -> None:
    r = await client.post(path, json=body, headers=AUTH)
    assert r.status == 400, await r.text()
    assert "detail" in await r.json()


async def test_oversized_bodies_get_a_413_whether_announced_or_streamed(
    client: TestClient, agent: AgentFixture
) -> None:
    big = b'{"to": "' + b"x" * 70_000 + b'"}'
    r = await client.post("/ha/switchover", data=big, headers=AUTH)
    assert r.status == 413 and "detail" in await r.json()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
        for _ in range(20):
            yield b" " * 4096

    r = await client.post("/ha/switchover", data=chunks(), headers=AUTH)
    assert r.status == 413 and "detail" in await r.json()
    assert agent.store.switchover is None


async def test_unknown_paths_and_methods_get_json_404_and_405(client: TestClient) -> None:
    r = await client.get("/no/such/path")
    assert r.status == 404 and r.content_type == "application/json"
    assert (await r.json())["detail"]
    r = await client.get("/ha/pause", headers=AUTH)
    assert r.status == 405 and "POST" in r.headers["Allow"]
    assert "detail" in await r.json()
    r = await client.delete("/ha/status")
    assert r.status == 405


@pytest.mark.parametrize("count", ["abc", "1e3", "", "99999999999999999999999x"])
async def test_history_count_must_be_an_integer(client: TestClient, count: str) -> None:
    r = await client.get("/ha/history", params={"count": count})
    assert r.status == 400 and "count" in (await r.json())["detail"]


async def test_history_count_is_clamped(client: TestClient) -> None:
    for count in ("-5", "0", "10000000"):
        r = await client.get("/ha/history", params={"count": count})
        assert r.status == 200 and isinstance(await r.json(), list)


async def test_an_unexpected_error_is_a_json_500_logged_as_a_bug(
    agent: AgentFixture, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("internal detail that must not leak")

    agent.api.get_status = boom  # type: ignore[method-assign]
    async with TestClient(TestServer(agent.api.app())) as c:
        r = await c.get("/ha/status")
        assert r.status == 500
        assert await r.json() == {"detail": "internal error"}
    assert "BUG: unhandled error answering GET /ha/status" in caplog.text


# -- the OpenAPI document ------------------------------------------------------------------


async def test_openapi_document_describes_exactly_the_routes(
    client: TestClient, agent: AgentFixture
) -> None:
    doc = await get_ok(client, "/openapi.json")
    assert doc == AGENT_SPEC
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in agent.api.app().router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for method, path in served:
        op = doc["paths"][path][method]
        needs_token = method != "get"
        assert ("security" in op) is needs_token, path
        if needs_token:
            assert "401" in op["responses"], path
