"""A stream's body passed through from the engine's connection to the client's, in the
event loop's own callbacks, because the relay's cost per streamed event bounds the
gateway's throughput.

Profiled under load (py-spy, bench/relay_local.py), most of the relay's Python time
per streamed event went to aiohttp's client machinery: the parser feeding a
StreamReader, a future woken per chunk, the task stepping through the async
iterator and the relay's coroutines, then StreamResponse.write. Here the engine's
connection has its own small protocol: `data_received` takes the HTTP/1.1 chunk
framing off, hands whole events to the relay's sink (a plain function: the byte
scans of migration.py, then one `transport.write` of the re-framed bytes to the
client) and wakes no coroutine at all until the stream ends, breaks, or the client
stops reading (then the engine's socket is paused until the client's drains).

Only streaming segments use this (one connection per segment, `Connection:
close`); everything else stays on the pooled aiohttp session (transport.py). The
connection is usually a spare opened ahead of the stream (spares.py), so that the
connect is off the stream's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast
from urllib.parse import urlsplit

from multidict import CIMultiDict

from ha_agent.gateway.upstream.transport import FailureCause, UpstreamFailure
from ha_agent.resolver import CachingResolver

# Sink(events) -> True once the stream is over (its last event was passed on).
Sink = Callable[[bytes], bool]
_MAX_HEAD = 64 * 1024
T = TypeVar("T")


class _Failure(Exception):
    """Carried from the protocol's callbacks to the waiting coroutine."""


class UpstreamStream(asyncio.Protocol):
    """One POST to an engine; its response head, then its body to a sink."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._head: asyncio.Future[tuple[int, CIMultiDict[str]]] | None = None
        self._end: asyncio.Future[None] | None = None
        self._head_done = False
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self._chunked = False
        self._remaining: int | None = None  # Content-Length still to come
        self._body = bytearray()  # a non-streaming answer (error statuses), read whole
        self._sink: Sink | None = None
        self._need = -1  # chunked: bytes of chunk data still expected (-1: a size line)
        self._finished = False
        self._sink_done = False  # the sink saw the stream's last event
        self._resumer: asyncio.Future[None] | None = None
        self.opened_at = 0.0  # the loop's clock when connected
        self.received = False  # a response byte came
        self.lost = False  # the engine closed it, or it broke

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._head = loop.create_future()
        self._end = loop.create_future()
        self.opened_at = loop.time()

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            if not self._head_done:
                data = self._read_head(data)
                if not self._head_done:
                    return
            if data:
                self._read_body(data)
        except _Failure as exc:
            self._fail(UpstreamFailure(str(exc)))
        except Exception as exc:  # the sink's: ClientGone, an engine abort, a bug
            self._fail(exc)

    def eof_received(self) -> bool | None:
        self.lost = True
        if self._remaining is None and not self._chunked and self._head_done:
            self._finish()  # a body delimited by the connection's end
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self._head_done:
            reason = f"connection error: {exc}" if exc else "connection closed before the response"
            self._fail(UpstreamFailure(reason, FailureCause.CLOSED))
        elif not self._finished:
            self._fail(
                UpstreamFailure(f"response body broken: {exc}", FailureCause.BROKEN)
                if exc
                else UpstreamFailure("stream ended without [DONE]", FailureCause.TRUNCATED)
            )

    # -- parsing -------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                raise _Failure("response head too large")
            self._buf = buf
            return b""
        self._buf = b""
        lines = buf[:end].decode("latin-1").split("\r\n")
        try:
            self.status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise _Failure(f"bad status line {lines[0][:80]!r}") from None
        for line in lines[1:]:
            key, _, value = line.partition(":")
            self.headers.add(key.strip(), value.strip())
        self._chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if not self._chunked and "Content-Length" in self.headers:
            try:
                self._remaining = int(self.headers["Content-Length"])
            except ValueError:
                raise _Failure("bad Content-Length") from None
        self._head_done = True
        assert self._head is not None
        if not self._head.done():
            self._head.set_result((self.status, self.headers))
        rest = buf[end + 4 :]
        if self._remaining == 0:
            self._finish()
        return rest

    def _read_body(self, data: bytes) -> None:
        if not self._chunked:
            if self._remaining is not None:
                data = data[: self._remaining]
                self._remaining -= len(data)
            self._deliver(data)
            if self._remaining == 0:
                self._finish()
            return
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        while pos < size and not self._finished:
            if self._need < 0:  # a chunk-size line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    self._need = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise _Failure("bad chunk size") from None
                pos = eol + 2
                if self._need == 0:
                    self._finish()  # trailers, if any, are not needed
                    return
                continue
            if size - pos < self._need + 2:  # a chunk not yet whole: pass on what is here
                take = min(size - pos, self._need)
                if take:
                    self._deliver(buf[pos : pos + take])
                    self._need -= take
                    pos += take
                break
            self._deliver(buf[pos : pos + self._need])
            pos += self._need + 2
            self._need = -1
        self._buf = buf[pos:] if pos < size else b""

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self._sink is None:
            self._body += data
        elif self._sink(data):
            self._sink_done = True
            self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._end is not None and not self._end.done():
            self._end.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        for fut in (self._head, self._end):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- the relay's side ----------------------------------------------------------------

    async def head(self) -> tuple[int, CIMultiDict[str]]:
        assert self._head is not None
        return await self._head

    async def read_all(self) -> bytes:
        """The whole body (an error answer)."""
        assert self._end is not None
        await self._end
        return bytes(self._body)

    async def pump(self, sink: Sink) -> None:
        """Hand every body byte to `sink` until it says the stream is over."""
        assert self._end is not None
        self._sink = sink
        if self._body:  # bytes that came with the head
            early, self._body = bytes(self._body), bytearray()
            try:
                if sink(early):
                    self._sink_done = True
                    self._finish()
            except Exception as exc:
                self._fail(exc)
                if self._end.done() and self._end.exception() is None:
                    raise  # the whole body had already come: _end holds no failure
        await self._end
        if not self._sink_done:  # the body ended cleanly, but before the last event
            raise UpstreamFailure("stream ended without [DONE]", FailureCause.TRUNCATED)

    def pause_until_drained(self, client: asyncio.Transport, low: int) -> None:
        """The client reads slower than the engine writes: stop reading the engine
        (TCP then slows it down) until the client's buffer is below `low`."""
        if self._resumer is not None or self.transport is None:
            return
        self.transport.pause_reading()
        self._resumer = asyncio.ensure_future(self._resume(client, low))

    async def _resume(self, client: asyncio.Transport, low: int) -> None:
        try:
            # The client's transport tells only its own protocol when it drains
            # (resume_writing); a slow reader is rare, so polling is cheap enough.
            while client.get_write_buffer_size() > low and not client.is_closing():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        finally:
            self._resumer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def close(self) -> None:
        if self._resumer is not None:
            self._resumer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
        for fut in (self._head, self._end):
            if fut is not None and not fut.done():
                fut.cancel()
            elif fut is not None and not fut.cancelled():
                fut.exception()  # retrieved: no "never retrieved" warning


if sys.version_info >= (3, 11):

    async def _bounded(work: Awaitable[T], timeout: float) -> T:
        """`wait_for` without its extra task and wake-ups (on every stream's path)."""
        async with asyncio.timeout(timeout):
            return await work

else:  # pragma: no cover - Python 3.10 (the gateway image, Debian bookworm, has 3.11)

    async def _bounded(work: Awaitable[T], timeout: float) -> T:
        return await asyncio.wait_for(work, timeout)


async def connect(
    url: str,
    resolver: CachingResolver,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | bool = True,
) -> UpstreamStream:
    """A connection to the engine at `url`, nothing sent yet. Failures to connect are
    `UpstreamFailure(connect=True)`."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await resolver.resolve(host, port, socket.AF_INET)
        address = infos[0]["host"]
        if tls:  # connected to the resolved address, verified against the URL's name
            connecting = loop.create_connection(
                UpstreamStream,
                address,
                port,
                ssl=ssl_context,
                server_hostname=host,
                ssl_handshake_timeout=connect_timeout,
            )
        else:
            connecting = loop.create_connection(UpstreamStream, address, port)
        _, proto = await _bounded(connecting, connect_timeout)
    except asyncio.TimeoutError:
        raise UpstreamFailure("timed out: connect", FailureCause.CONNECT, connect=True) from None
    except (OSError, IndexError, KeyError) as exc:
        raise UpstreamFailure(
            f"connect failed: {exc}", FailureCause.CONNECT, connect=True
        ) from None
    return proto


def send(
    proto: UpstreamStream, url: str, path_qs: str, headers: CIMultiDict[str], body: bytes
) -> None:
    """Write the request on `proto`'s connection; the protocol then collects the answer."""
    lines = [f"POST {path_qs} HTTP/1.1", f"Host: {urlsplit(url).netloc}"]
    for key, value in headers.items():
        if key.lower() != "connection":
            lines.append(f"{key}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    assert proto.transport is not None
    with contextlib.suppress(RuntimeError):
        proto.transport.write(head + body)


async def open_stream(
    url: str,
    path_qs: str,
    headers: CIMultiDict[str],
    body: bytes,
    resolver: CachingResolver,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | bool = True,
) -> UpstreamStream:
    """Connect to the engine at `url` and send the request; the protocol then
    collects the answer. Failures to connect are `UpstreamFailure(connect=True)`."""
    proto = await connect(url, resolver, connect_timeout, ssl_context)
    send(proto, url, path_qs, headers, body)
    return proto
