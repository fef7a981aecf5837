"""A bare aiohttp app as the relay runs its data port (uvloop, a catch-all route,
handler_cancellation, no access log), timing each request from its first bytes
(RequestHandler.data_received) to its handler: aiohttp's own share of the relay's
"data->handle" stage. `python aiohttp_bare_server.py SECONDS`; with PREPARE=1 an
on_response_prepare hook is added, as the relay has; with LOWLEVEL=1 the same handler
runs on aiohttp's low-level server (web.Server: no application, router or signals).
Prints the quantiles at the end. LOWLEVEL was added for the runs of
2026-12-07-1934-request-path-cold/aiohttp-lowlevel.log; without it the server is as it
ran for bare.log here.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import uvloop
from aiohttp import web, web_protocol

PORT = 18123
first_bytes: dict[int, int | None] = {}  # by id(protocol): set at connection_made
waits: list[int] = []

_data_received = web_protocol.RequestHandler.data_received
_connection_made = web_protocol.RequestHandler.connection_made


def data_received(self: Any, data: bytes) -> None:
    if data and first_bytes.get(id(self)) is None:
        first_bytes[id(self)] = time.perf_counter_ns()
    _data_received(self, data)


def connection_made(self: Any, transport: Any) -> None:
    first_bytes[id(self)] = None  # ids are reused once a protocol is freed
    _connection_made(self, transport)


web_protocol.RequestHandler.data_received = data_received  # type: ignore[method-assign]
web_protocol.RequestHandler.connection_made = connection_made  # type: ignore[method-assign]


async def handle(request: web.BaseRequest) -> web.Response:
    began = first_bytes.get(id(request.protocol))
    if began is not None:
        waits.append(time.perf_counter_ns() - began)
    await request.read()
    return web.Response(text="ok")


async def prepare(request: web.Request, response: web.StreamResponse) -> None:
    return None


async def main(seconds: float) -> None:
    runner: web.BaseRunner
    if os.environ.get("LOWLEVEL"):
        runner = web.ServerRunner(
            web.Server(handle, access_log=None, handler_cancellation=True), handle_signals=False
        )
    else:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        if os.environ.get("PREPARE"):
            app.on_response_prepare.append(prepare)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, handler_cancellation=True
        )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    await asyncio.sleep(seconds)
    s = sorted(waits)
    n = len(s)
    p50, p90 = s[n // 2] / 1e3, s[int(n * 0.9)] / 1e3
    hook = os.environ.get("PREPARE", "")
    print(
        f"data->handle n {n} p50 {p50:.0f} p90 {p90:.0f} us"
        f" (PREPARE={hook} LOWLEVEL={os.environ.get('LOWLEVEL', '')})"
    )


if __name__ == "__main__":
    uvloop.run(main(float(sys.argv[1])))
