"""The least a Python hop can do (a measurement, not shipped): uvloop, one protocol per
side, no HTTP framework, no checks. It reads a request whole (head and Content-Length
body), writes the client's bytes unchanged on a spare connection to the engine (opened
ahead, as the relay's spares.py does), and passes every response byte back as it
comes. Run as N processes on one SO_REUSEPORT port, as the relay's workers:

    python forwarder.py PORT ENGINE_HOST ENGINE_PORT
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from typing import cast

import uvloop

SPARES = 4


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.client: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.close()


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ready: list[Upstream] = []
        self.opening = 0
        self.tasks: set[asyncio.Future[None]] = set()  # held until done

    async def _open(self) -> Upstream:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(Upstream, self.host, self.port)
        return proto

    async def _refill(self) -> None:
        try:
            self.ready.append(await self._open())
        finally:
            self.opening -= 1

    def top_up(self) -> None:
        while len(self.ready) + self.opening < SPARES:
            self.opening += 1  # counted now: the task starts on the next loop turn
            self.keep(asyncio.ensure_future(self._refill()))

    def keep(self, task: asyncio.Future[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def take_now(self) -> Upstream | None:
        """A spare at once, or None (then `take`)."""
        up = self.ready.pop() if self.ready else None
        self.top_up()
        return up

    async def take(self) -> Upstream:
        up = self.ready.pop() if self.ready else await self._open()
        self.top_up()
        return up


class Client(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.sent:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = 0
        for line in self.buf[:end].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        self.sent = True
        up = self.pool.take_now()
        if up is None:  # no spare: connect first (not the measured case)
            self.pool.keep(asyncio.ensure_future(self._forward(self.buf)))
        else:
            self._send(up, self.buf)

    async def _forward(self, request: bytes) -> None:
        self._send(await self.pool.take(), request)

    def _send(self, up: Upstream, request: bytes) -> None:
        up.client = self.transport
        assert up.transport is not None
        up.transport.write(request)


async def main(port: int, host: str, engine_port: int) -> None:
    if os.environ.get("FORWARDER_GC_FREEZE"):  # as the relay's daemon.py does
        gc.freeze()
    loop = asyncio.get_running_loop()
    pool = Pool(host, engine_port)
    pool.top_up()
    server = await loop.create_server(
        lambda: Client(pool), "127.0.0.1", port, reuse_port=True, backlog=1024
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
