"""The relay (`python -m ha_agent.gateway`) with the request path's moments stamped.

Run in place of the relay by run.py. Each stream request gets `time.monotonic_ns()`
(one clock for every process on the host) at: the connection's `connection_made`
(`conn`) and first `data_received` (`data`) in aiohttp, the handler's start (`handle`),
and the request's write to the engine (`send`). Written to
`$TIMED_OUT/relay-<pid>.json` when the worker exits. For a diagnosis only: the
wrappers add some µs to each stage.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import time
from typing import Any

from aiohttp import web, web_protocol

from ha_agent.gateway.stream import passthrough, relay

records: list[dict[str, int]] = []
by_conn: dict[int, dict[str, int]] = {}  # RequestHandler has __slots__: keyed by id()
current: dict[str, int] | None = None  # one request at a time per worker (1 slot)

_made = web_protocol.RequestHandler.connection_made
_received = web_protocol.RequestHandler.data_received
_handle = relay.Relay.handle
_send = passthrough.send


def connection_made(self: web_protocol.RequestHandler, transport: Any) -> None:
    by_conn[id(self)] = {"conn": time.monotonic_ns()}
    _made(self, transport)


def data_received(self: web_protocol.RequestHandler, data: bytes) -> None:
    by_conn.setdefault(id(self), {}).setdefault("data", time.monotonic_ns())
    _received(self, data)


async def handle(self: relay.Relay, request: web.Request) -> web.StreamResponse:
    global current
    rec = {**by_conn.pop(id(request.protocol), {}), "handle": time.monotonic_ns()}
    current = rec
    try:
        return await _handle(self, request)
    finally:
        records.append(rec)


def send(proto: Any, url: str, path_qs: str, headers: Any, body: bytes) -> None:
    if current is not None:
        current.setdefault("send", time.monotonic_ns())
    _send(proto, url, path_qs, headers, body)


def dump() -> None:
    out = os.path.join(os.environ["TIMED_OUT"], f"relay-{os.getpid()}.json")
    with open(out, "w") as f:
        json.dump(records, f)


web_protocol.RequestHandler.connection_made = connection_made  # type: ignore[method-assign]
web_protocol.RequestHandler.data_received = data_received  # type: ignore[method-assign]
relay.Relay.handle = handle  # type: ignore[method-assign]
passthrough.send = send
atexit.register(dump)
runpy.run_module("ha_agent.gateway", run_name="__main__")
