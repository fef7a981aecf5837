"""Stamps the relay's request path in stages (a measurement, not shipped).

Loaded by every Python process started with PYTHONPATH=<this folder>; active only with
PATH_OUT set, and writes PATH_OUT.<pid> at exit from each relay worker that served a
stream. Tidied for ruff and mypy after the runs in stages.log (the same stamps).
"""

from __future__ import annotations

import os
from typing import Any

if os.environ.get("PATH_OUT"):
    import atexit
    import time

    from aiohttp import web_protocol

    from ha_agent.gateway.admission import gate
    from ha_agent.gateway.stream import passthrough, relay

    STAGES = ("data->handle", "conn->data", "handle->admit", "admit", "admit->send", "send")
    cur: dict[str, int] = {}
    rows: list[tuple[int, ...]] = []

    orig_data_received = web_protocol.RequestHandler.data_received
    orig_connection_made = web_protocol.RequestHandler.connection_made
    orig_handle = relay.Relay.handle
    orig_admit = gate.Admission.admit
    orig_send = passthrough.send

    def data_received(self: Any, data: bytes) -> None:
        cur.setdefault("d0", time.perf_counter_ns())
        orig_data_received(self, data)

    def connection_made(self: Any, transport: Any) -> None:
        cur["c0"] = time.perf_counter_ns()
        orig_connection_made(self, transport)

    async def handle(self: Any, request: Any) -> Any:
        cur["t0"] = time.perf_counter_ns()
        return await orig_handle(self, request)

    async def admit(self: Any, *args: Any, **kwargs: Any) -> Any:
        cur["a0"] = time.perf_counter_ns()
        result = await orig_admit(self, *args, **kwargs)
        cur["a1"] = time.perf_counter_ns()
        return result

    def send(proto: Any, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter_ns()
        orig_send(proto, *args, **kwargs)
        t2 = time.perf_counter_ns()
        if "t0" in cur and "a1" in cur:
            d0 = cur.get("d0", cur["t0"])
            rows.append(
                (
                    cur["t0"] - d0,
                    cur.get("d0", 0) - cur.get("c0", cur.get("d0", 0)),
                    cur["a0"] - cur["t0"],
                    cur["a1"] - cur["a0"],
                    t - cur["a1"],
                    t2 - t,
                )
            )
        cur.clear()

    def dump() -> None:
        if not rows:
            return
        with open(os.environ["PATH_OUT"] + f".{os.getpid()}", "w") as f:
            for i, name in enumerate(STAGES):
                s = sorted(x[i] / 1e3 for x in rows)
                n = len(s)
                p50, p90, p99 = s[n // 2], s[int(n * 0.9)], s[int(n * 0.99)]
                f.write(f"{name:<14} n {n} p50 {p50:.0f} p90 {p90:.0f} p99 {p99:.0f} us\n")

    web_protocol.RequestHandler.data_received = data_received  # type: ignore[method-assign]
    web_protocol.RequestHandler.connection_made = connection_made  # type: ignore[method-assign]
    relay.Relay.handle = handle  # type: ignore[method-assign]
    gate.Admission.admit = admit  # type: ignore[method-assign]
    passthrough.send = send
    atexit.register(dump)
