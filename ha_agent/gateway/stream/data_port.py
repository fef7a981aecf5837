"""The relay's data port: every request to one handler, on aiohttp's low-level server.

The relay has a single catch-all route, so an `web.Application` (a router to resolve,
a match info to build, a signal to send for every response) is machinery it does not
use; `web.Server` is aiohttp's documented server for a handler that takes every
request. Measured on the development machine (2 shared cores, AMD EPYC, aiohttp
3.14.5, Python 3.11): 108-113 µs from a request's first bytes to its handler at the
p50, against 148-161 µs for the same handler behind an application
(bench/results/gateway-bars-runs/2026-12-07-1934-request-path-cold/aiohttp-lowlevel.log),
on a request path the gateway's light-load latency bar reads (docs/benchmarks.md).

What the application did that the relay needs is done here instead:
- the response hooks (the gateway's CORS headers, the rid pair) run as a response is
  prepared, from `RelayRequest._prepare_hook`, where aiohttp's `web.Request` sends
  its application's `on_response_prepare`;
- `Expect: 100-continue` is answered as aiohttp's router answers it;
- the body size limit (`client_max_size`), a 413 as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

PrepareHook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RelayRequest(web.Request):
    """A `web.Request` with no application behind it: its prepare hook runs the data
    port's response hooks instead of an application's signal."""

    ATTRS = web.Request.ATTRS | frozenset(["_hooks"])

    def __init__(self, *args: Any, hooks: tuple[PrepareHook, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hooks = hooks

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        for hook in self._hooks:
            await hook(self, response)


class DataPort:
    """`handler` for every request, with `hooks` on every response and bodies of at
    most `max_body` bytes (a 413 above)."""

    def __init__(self, handler: Handler, hooks: tuple[PrepareHook, ...], max_body: int) -> None:
        self.handler = handler
        self.hooks = hooks
        self.max_body = max_body

    def make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> RelayRequest:
        return RelayRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            asyncio.get_running_loop(),
            client_max_size=self.max_body,
            hooks=self.hooks,
        )

    async def serve(self, request: web.BaseRequest) -> web.StreamResponse:
        assert isinstance(request, RelayRequest)  # make_request made it
        if request.headers.get(hdrs.EXPECT):
            await _expect(request)
            await request.writer.drain()
        return await self.handler(request)

    def options(self) -> dict[str, Any]:
        """`web.Server`'s arguments besides the handler (the tests' RawTestServer
        takes the same). handler_cancellation: a client that disconnects cancels its
        request, which closes the upstream connection, which makes the engine abort
        the generation."""
        return {
            "request_factory": self.make_request,
            "handler_cancellation": True,
            "access_log": None,
        }

    def server(self) -> web.Server:
        return web.Server(self.serve, **self.options())


async def _expect(request: web.Request) -> None:
    """aiohttp's router's answer to `Expect` (web_urldispatcher's default expect
    handler): `100 Continue` for an HTTP/1.1 `100-continue`, 417 for anything else."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the answer's own size starts after this line
