"""The relay's data port on aiohttp's low-level server (data_port.py): what the
application used to do for it, still done."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient

from ha_agent.gateway.stream.data_port import DataPort
from tests.support.relay_server import RelayTestServer


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if request.path == "/stream":
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(body)
        return response
    return web.Response(body=body)


async def _mark(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Hook"] = response.headers.get("X-Hook", "") + "a"


async def _mark_again(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Hook"] = response.headers.get("X-Hook", "") + "b"


def _port(max_body: int = 1024) -> DataPort:
    return DataPort(_echo, (_mark, _mark_again), max_body)


async def test_every_answer_gets_the_hooks_in_order_streams_included() -> None:
    async with TestClient(RelayTestServer(_port())) as client:
        for path in ("/any/path", "/stream"):
            r = await client.post(path, data=b"hello")
            assert r.status == 200 and await r.read() == b"hello"
            assert r.headers["X-Hook"] == "ab", path


async def test_a_body_over_the_limit_is_413() -> None:
    async with TestClient(RelayTestServer(_port(max_body=16))) as client:
        r = await client.post("/x", data=b"x" * 64)
        # _echo lets aiohttp's HTTPRequestEntityTooLarge out: aiohttp answers it.
        assert r.status == 413


async def _raw(port: int, head: bytes, body: bytes, wait_for_continue: bool) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        if wait_for_continue:
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line == b"HTTP/1.1 100 Continue\r\n", line
            assert await asyncio.wait_for(reader.readline(), 5) == b"\r\n"
        writer.write(body)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    """curl sends `Expect: 100-continue` with a body over 1 KiB and waits for it."""
    server = RelayTestServer(_port())
    async with TestClient(server):
        assert server.port is not None
        head = (
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        answer = await _raw(server.port, head, b"hello", wait_for_continue=True)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"hello")


async def test_an_unknown_expectation_is_417() -> None:
    server = RelayTestServer(_port())
    async with TestClient(server):
        assert server.port is not None
        head = (
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: something-else\r\nConnection: close\r\n\r\n"
        )
        answer = await _raw(server.port, head, b"hello", wait_for_continue=False)
        assert answer.startswith(b"HTTP/1.1 417 "), answer[:60]
