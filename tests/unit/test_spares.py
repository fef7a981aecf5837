"""Spare engine connections (ha_agent/gateway/stream/spares.py): a stream goes out on a
connection opened before it; one the engine closed never loses the request; spares
follow the topology, back off from a dead engine and are closed on shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.dcs.base import Role
from ha_agent.gateway.stream import spares as spares_mod
from ha_agent.gateway.stream.relay import NODE_HEADER, Relay
from tests.support.fakes import agent_status, relay_over

CHUNK = {
    "id": "c1",
    "object": "chat.completion.chunk",
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
}
EVENTS = [b"data: " + json.dumps(CHUNK).encode() + b"\n\n", b"data: [DONE]\n\n"]
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@dataclass
class Conn:
    accepted_at: float
    writer: asyncio.StreamWriter
    requested_at: float | None = None


@dataclass
class Engine:
    """A socket server answering every POST with a two-event chat stream, that
    records each connection: when it was accepted, whether a request came on it."""

    conns: list[Conn] = field(default_factory=list)
    # Connections accepted before this instant close, unanswered, when a request
    # comes on them (an idle connection the engine closed as the request was written).
    drop_older_than: float = 0.0
    close_at_once: bool = False  # accept, then close (an engine shutting down)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def idle(self) -> list[Conn]:
        return [c for c in self.conns if c.requested_at is None and not c.writer.is_closing()]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(time.monotonic(), writer)
        self.conns.append(conn)
        if self.close_at_once:
            writer.close()
            return
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        conn.requested_at = time.monotonic()
        if conn.accepted_at < self.drop_older_than:
            writer.transport.abort()
            return
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        body = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n"
        writer.write(HEAD + body)
        await writer.drain()
        writer.close()


async def start_engine(engine: Engine | None = None) -> Engine:
    engine = engine or Engine()
    engine.server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
    return engine


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@dataclass
class Rig:
    relay: Relay
    engines: list[Engine]
    client: TestClient
    stop: asyncio.Event
    task: asyncio.Future[None]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    engines = [await start_engine(), await start_engine()]
    relay = relay_over([e.url for e in engines], spare_connections=2)
    client: TestClient = TestClient(TestServer(relay.app()))
    await client.start_server()
    stop = asyncio.Event()
    task = asyncio.ensure_future(relay.spares.run(stop))
    try:
        yield Rig(relay, engines, client, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await client.close()
        for e in engines:
            assert e.server is not None
            e.server.close()


async def stream(rig: Rig) -> tuple[int, str, bytes]:
    async with rig.client.post("/v1/chat/completions", json=BODY) as r:
        return r.status, r.headers.get(NODE_HEADER, ""), await r.read()


async def test_a_stream_goes_out_on_a_connection_opened_before_it(rig: Rig) -> None:
    primary = rig.engines[0]
    await wait_for(lambda: len(primary.idle()) == 2)
    assert not rig.engines[1].conns, "no spares to the standby: it is not in rotation"
    sent_at = time.monotonic()
    status, node, body = await stream(rig)
    assert (status, node) == (200, "sglang-01")
    assert body.endswith(b"data: [DONE]\n\n")
    served = [c for c in primary.conns if c.requested_at is not None]
    assert len(served) == 1 and served[0].accepted_at < sent_at
    await wait_for(lambda: len(primary.idle()) == 2)  # replaced


async def test_a_spare_the_engine_closed_is_never_used(rig: Rig) -> None:
    primary = rig.engines[0]
    await wait_for(lambda: len(primary.idle()) == 2)
    for conn in primary.idle():
        conn.writer.transport.abort()
    results = await asyncio.gather(*(stream(rig) for _ in range(3)))
    assert [(s, n) for s, n, _ in results] == [(200, "sglang-01")] * 3
    assert all(b.endswith(b"data: [DONE]\n\n") for _, _, b in results)


async def test_a_spare_closed_under_the_request_falls_back_to_a_fresh_connection(
    rig: Rig,
) -> None:
    primary = rig.engines[0]
    await wait_for(lambda: len(primary.idle()) == 2)
    # Every connection open now closes, unanswered, when the request arrives on it.
    primary.drop_older_than = time.monotonic()
    status, node, body = await stream(rig)
    # Served by the primary on a fresh connection: not sent to the standby, not failed.
    assert (status, node) == (200, "sglang-01")
    assert body.endswith(b"data: [DONE]\n\n")
    dropped = [c for c in primary.conns if c.accepted_at < primary.drop_older_than]
    assert sum(c.requested_at is not None for c in dropped) == 1
    assert not rig.engines[1].conns


async def test_spares_follow_the_primary_and_leave_a_fenced_or_failed_node(rig: Rig) -> None:
    one, two = rig.engines
    topology = rig.relay.topology
    await wait_for(lambda: len(one.idle()) == 2)
    topology.primary = "sglang-02"
    topology.nodes["sglang-02"].status = agent_status("sglang-02", Role.PRIMARY)
    await wait_for(lambda: len(two.idle()) == 2 and not one.idle())
    assert set(rig.relay.spares.idle) == {two.url}
    # Fenced: it serves nothing as primary until it renews.
    topology.nodes["sglang-02"].status = agent_status("sglang-02", Role.FENCED)
    await wait_for(lambda: not two.idle())
    topology.nodes["sglang-02"].status = agent_status("sglang-02", Role.PRIMARY)
    await wait_for(lambda: len(two.idle()) == 2)
    topology.nodes["sglang-02"].failed = True
    await wait_for(lambda: not two.idle())
    assert not rig.relay.spares.idle


async def test_a_stale_spare_is_replaced(rig: Rig) -> None:
    rig.relay.spares.max_age = 0.3
    primary = rig.engines[0]
    await wait_for(lambda: len(primary.idle()) == 2)
    first = {id(c) for c in primary.idle()}
    await wait_for(lambda: len(primary.idle()) == 2 and not first & {id(c) for c in primary.idle()})
    status, _, _ = await stream(rig)
    assert status == 200


async def test_spares_are_closed_on_shutdown(rig: Rig) -> None:
    primary = rig.engines[0]
    await wait_for(lambda: len(primary.idle()) == 2)
    rig.stop.set()
    await asyncio.wait_for(rig.task, 5)
    await wait_for(lambda: not primary.idle())
    assert not rig.relay.spares.idle


async def test_an_unreachable_engine_is_not_reconnected_to_in_a_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()  # nothing listens there now
    relay = relay_over([url], spare_connections=2)
    tries = 0
    connect = spares_mod.passthrough.connect

    async def counting(*args, **kwargs):
        nonlocal tries
        tries += 1
        return await connect(*args, **kwargs)

    monkeypatch.setattr(spares_mod.passthrough, "connect", counting)
    stop = asyncio.Event()
    task = asyncio.ensure_future(relay.spares.run(stop))
    await asyncio.sleep(2.0)  # the window in which attempts are counted
    stop.set()
    await asyncio.wait_for(task, 5)
    # Two spares, each retried after 0.1, 0.2, 0.4, 0.8 s ...: a handful, not one per
    # tick (0.1 s: 40 in 2 s).
    assert 2 <= tries <= 12
    assert not relay.spares.idle


async def test_an_engine_that_closes_every_connection_is_backed_off_from() -> None:
    engine = await start_engine(Engine(close_at_once=True))
    relay = relay_over([engine.url], spare_connections=2)
    stop = asyncio.Event()
    task = asyncio.ensure_future(relay.spares.run(stop))
    await asyncio.sleep(2.0)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert engine.server is not None
    engine.server.close()
    assert 2 <= len(engine.conns) <= 16


async def test_idle_spares_wake_the_relay_seldom(rig: Rig) -> None:
    """Each wake-up of a relay worker costs CPU (0.15-0.45 ms on the dev VM): held
    spares are looked at when one is due, not on a fast fixed tick, and an engine
    given up on (out of rotation after refused connects) leaves no tight loop."""
    spares = rig.relay.spares
    looks = 0
    tend = spares.tend

    def counted() -> None:
        nonlocal looks
        looks += 1
        tend()

    spares.tend = counted  # type: ignore[method-assign]
    await wait_for(lambda: len(rig.engines[0].idle()) == 2)
    looks = 0
    await asyncio.sleep(1.5)
    assert looks <= 5, f"{looks} looks in 1.5 s with nothing due"
    # The primary's engine goes away: refused connects back off, then it leaves.
    one = rig.engines[0]
    url = one.url
    assert one.server is not None
    one.server.close()
    await one.server.wait_closed()
    for conn in one.conns:
        conn.writer.transport.abort()
    await wait_for(lambda: spares._retry_at.get(url) is not None)
    rig.relay.topology.nodes["sglang-01"].failed = True
    await asyncio.sleep(0.6)
    looks = 0
    await asyncio.sleep(1.5)
    assert looks <= 5, f"{looks} looks in 1.5 s after the engine was given up"
