"""The stream pass-through's HTTP/1.1 reading (ha_agent/gateway/stream/passthrough.py), against a
real socket server that frames its answers as uvicorn and aiohttp do, cut at
awkward places: what the relay's sink receives is exactly the body, whatever the
reads look like, and a body cut short is a failure, never a clean end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from multidict import CIMultiDict

from ha_agent.gateway.stream.passthrough import UpstreamStream, open_stream
from ha_agent.gateway.upstream.transport import UpstreamFailure
from ha_agent.resolver import CachingResolver

EVENTS = [b'data: {"n":%d,"x":"%s"}\n\n' % (i, b"y" * (i * 7)) for i in range(40)] + [
    b"data: [DONE]\n\n"
]


def chunked(parts: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def serve(answer: bytes, cut: int, close_early: bool = False) -> tuple[asyncio.Server, int]:
    """A server that reads the request, then writes `answer` in pieces of `cut` bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i in range(0, len(answer), cut):
            writer.write(answer[i : i + cut])
            await writer.drain()
            await asyncio.sleep(0)
        if close_early:
            writer.transport.abort()
            return
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def resolver() -> AsyncIterator[CachingResolver]:
    yield CachingResolver()


async def run_stream(
    port: int,
    resolver: CachingResolver,
    sink_factory: Callable[[list[bytes]], Callable[[bytes], bool]],
) -> tuple[int, list[bytes]]:
    conn: UpstreamStream = await open_stream(
        f"http://127.0.0.1:{port}", "/v1/chat/completions", CIMultiDict(), b"{}", resolver, 2.0
    )
    got: list[bytes] = []
    try:
        status, _ = await asyncio.wait_for(conn.head(), 5)
        await asyncio.wait_for(conn.pump(sink_factory(got)), 5)
        return status, got
    finally:
        conn.close()


def until_done(got: list[bytes]) -> Callable[[bytes], bool]:
    def sink(data: bytes) -> bool:
        got.append(data)
        return b"".join(got).endswith(b"data: [DONE]\n\n")

    return sink


@pytest.mark.parametrize("cut", [1, 3, 17, 64, 4096])
async def test_the_body_arrives_whole_however_the_reads_fall(
    resolver: CachingResolver, cut: int
) -> None:
    server, port = await serve(HEAD + chunked(EVENTS), cut)
    async with server:
        status, got = await run_stream(port, resolver, until_done)
    assert status == 200
    assert b"".join(got) == b"".join(EVENTS)


async def test_a_body_cut_short_is_a_failure(resolver: CachingResolver) -> None:
    answer = HEAD + chunked(EVENTS)
    server, port = await serve(answer[: len(answer) // 2], 50, close_early=True)
    async with server:
        with pytest.raises(UpstreamFailure):
            await run_stream(port, resolver, until_done)


async def test_an_error_answer_is_read_whole(resolver: CachingResolver) -> None:
    body = b'{"object":"error","message":"bad","code":400}'
    answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    server, port = await serve(answer, 7)
    async with server:
        conn = await open_stream(
            f"http://127.0.0.1:{port}", "/generate", CIMultiDict(), b"{}", resolver, 2.0
        )
        try:
            status, headers = await asyncio.wait_for(conn.head(), 5)
            assert status == 400
            assert headers["Content-Length"] == str(len(body))
            assert await asyncio.wait_for(conn.read_all(), 5) == body
        finally:
            conn.close()


async def test_nothing_listening_is_a_connect_failure(resolver: CachingResolver) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamFailure) as failure:
        await open_stream(f"http://127.0.0.1:{port}", "/x", CIMultiDict(), b"", resolver, 2.0)
    assert failure.value.connect


async def test_an_exception_in_the_sink_reaches_the_relay(resolver: CachingResolver) -> None:
    class Gone(Exception):
        pass

    def failing(got: list[bytes]) -> Callable[[bytes], bool]:
        def sink(data: bytes) -> bool:
            raise Gone()

        return sink

    server, port = await serve(HEAD + chunked(EVENTS), 64)
    async with server:
        with pytest.raises(Gone):
            await run_stream(port, resolver, failing)


async def test_a_body_that_ends_before_the_last_event_is_a_failure(
    resolver: CachingResolver,
) -> None:
    """A clean end of the HTTP body (the last chunk) without [DONE] is a break too."""
    server, port = await serve(HEAD + chunked(EVENTS[:10]), 64)
    async with server:
        with pytest.raises(UpstreamFailure, match="without"):
            await run_stream(port, resolver, until_done)
