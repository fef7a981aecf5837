"""The failsafe acknowledgement over real HTTP: a lost answer is asked again within
its budget, a refusal is final, and a peer that never answers costs no more than
the budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ha_agent.node.peers import PeerClient


class Peer:
    def __init__(self) -> None:
        self.answers: list[str] = []  # per request: "hang", "ok" or "refuse"
        self.seen = 0

    async def failsafe(self, request: web.Request) -> web.Response:
        self.seen += 1
        answer = self.answers.pop(0) if self.answers else "ok"
        if answer == "hang":
            await asyncio.sleep(5)
        body = await request.json()
        assert body == {"leader": "sglang-01", "epoch": 7}
        assert request.headers["Authorization"] == "Bearer t0ken"
        return web.json_response({}, status=200 if answer == "ok" else 409)


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Peer, str]]:
    p = Peer()
    app = web.Application()
    app.router.add_post("/ha/failsafe", p.failsafe)
    server = TestServer(app)
    await server.start_server()
    yield p, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_an_unanswered_ack_is_asked_again_within_the_budget(
    peer: tuple[Peer, str],
) -> None:
    p, url = peer
    p.answers = ["hang", "ok"]
    client = PeerClient(timeout=0.2, admin_token="t0ken", ack_budget=1.0)
    try:
        assert await client.failsafe_ack(url, "sglang-01", 7)
        assert p.seen == 2
    finally:
        await client.close()


async def test_a_refusal_is_final(peer: tuple[Peer, str]) -> None:
    p, url = peer
    p.answers = ["refuse", "ok"]
    client = PeerClient(timeout=0.2, admin_token="t0ken", ack_budget=1.0)
    try:
        assert not await client.failsafe_ack(url, "sglang-01", 7)
        assert p.seen == 1
    finally:
        await client.close()


async def test_a_silent_peer_costs_at_most_the_budget(peer: tuple[Peer, str]) -> None:
    p, url = peer
    p.answers = ["hang"] * 10
    client = PeerClient(timeout=0.2, admin_token="t0ken", ack_budget=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        assert not await client.failsafe_ack(url, "sglang-01", 7)
    finally:
        await client.close()
    # Bounded by the budget (plus scheduling slack), not by the peer's 5 s hang.
    assert loop.time() - started < 2.0
    assert 2 <= p.seen <= 3
