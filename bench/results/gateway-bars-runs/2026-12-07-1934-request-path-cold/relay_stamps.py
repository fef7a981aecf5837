"""Stamps in the relay's workers (a measurement, not shipped).

Loaded by every Python process started with PYTHONPATH=<this folder>; acts only in a
relay worker (`python -m ha_agent.gateway`) and only for the modes whose variable is
set; each writes <variable's value>.<pid> at the worker's exit:

- STAGE_OUT: each request's path in stages, µs: aiohttp's connection_made, from it to
  the request's first bytes, from those to the relay's handler, from the handler to
  the write to the engine (passthrough.send), and that write.
- STAMP_OUT with STAMP_FUNCS (`module:Qual.name,...`): each listed function's own
  time per call, µs (async ones across their awaits).
- WARM_OUT: inference.parse_json timed three times in a row on the request's own body:
  the first call as the request path runs it, the next two on caches it just warmed.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any

_ns = time.perf_counter_ns


def _quantiles(xs: list[int]) -> str:
    s = sorted(xs)
    n = len(s)
    return f"n {n:5d} p50 {s[n // 2] / 1e3:7.1f} p90 {s[int(n * 0.9)] / 1e3:7.1f} us"


def _write(var: str, lines: list[str]) -> None:
    if lines:
        with open(os.environ[var] + f".{os.getpid()}", "w") as f:
            f.write("".join(line + "\n" for line in lines))


def _stages() -> None:
    from aiohttp import web_protocol

    from ha_agent.gateway.stream import passthrough, relay

    names = ("conn_made", "conn->data", "data->handle", "handle->send", "send")
    cur: dict[str, int] = {}
    rows: list[tuple[int, ...]] = []
    data_received = web_protocol.RequestHandler.data_received
    connection_made = web_protocol.RequestHandler.connection_made
    handle = relay.Relay.handle
    send = passthrough.send

    def stamped_data_received(self: Any, data: bytes) -> None:
        cur.setdefault("d0", _ns())
        data_received(self, data)

    def stamped_connection_made(self: Any, transport: Any) -> None:
        cur.clear()
        cur["c0"] = _ns()
        connection_made(self, transport)
        cur["c1"] = _ns()

    async def stamped_handle(self: Any, request: Any) -> Any:
        cur["t0"] = _ns()
        return await handle(self, request)

    def stamped_send(proto: Any, *args: Any, **kwargs: Any) -> None:
        t = _ns()
        send(proto, *args, **kwargs)
        if {"c0", "d0", "t0"} <= cur.keys():
            c0, c1, d0, t0 = cur["c0"], cur["c1"], cur["d0"], cur["t0"]
            rows.append((c1 - c0, d0 - c1, t0 - d0, t - t0, _ns() - t))
        cur.clear()

    web_protocol.RequestHandler.data_received = stamped_data_received  # type: ignore[method-assign]
    web_protocol.RequestHandler.connection_made = stamped_connection_made  # type: ignore[method-assign]
    relay.Relay.handle = stamped_handle  # type: ignore[method-assign]
    passthrough.send = stamped_send
    atexit.register(
        lambda: _write(
            "STAGE_OUT",
            [f"{name:<14} {_quantiles([r[i] for r in rows])}" for i, name in enumerate(names)]
            if rows
            else [],
        )
    )


def _functions() -> None:
    rows: dict[str, list[int]] = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t = _ns()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    rows.setdefault(name, []).append(_ns() - t)

            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = _ns()
            try:
                return fn(*args, **kwargs)
            finally:
                rows.setdefault(name, []).append(_ns() - t)

        return timed

    for spec in os.environ["STAMP_FUNCS"].split(","):
        module, _, qualname = spec.partition(":")
        owner: Any = importlib.import_module(module)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, attr, wrap(qualname, getattr(owner, attr)))
    atexit.register(
        lambda: _write("STAMP_OUT", [f"{k:<32} {_quantiles(v)}" for k, v in rows.items()])
    )


def _warm() -> None:
    from ha_agent.openapi import inference

    parse = inference.parse_json
    rows: list[tuple[int, int, int]] = []

    def parse_thrice(body: bytes) -> Any:
        t0 = _ns()
        out = parse(body)
        t1 = _ns()
        parse(body)
        t2 = _ns()
        parse(body)
        rows.append((t1 - t0, t2 - t1, _ns() - t2))
        return out

    inference.parse_json = parse_thrice
    atexit.register(
        lambda: _write(
            "WARM_OUT",
            [f"parse_json call {i + 1}: {_quantiles([r[i] for r in rows])}" for i in range(3)]
            if rows
            else [],
        )
    )


if "ha_agent.gateway" in getattr(sys, "orig_argv", []):
    if os.environ.get("STAGE_OUT"):
        _stages()
    if os.environ.get("STAMP_OUT") and os.environ.get("STAMP_FUNCS"):
        _functions()
    if os.environ.get("WARM_OUT"):
        _warm()
