"""Run the engine simulator for tests: in-process (aiohttp) or as a real process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp import web

from ha_agent.config import SimSettings
from ha_agent.sim.__main__ import serving_ssl
from ha_agent.sim.server import create_app
from tests.support.processes import free_port, stop_process, wait_until

FAST = {
    "startup_delay": 0.0,
    "ttft_base": 0.005,
    "prefill_per_token": 0.0,
    "itl": 0.005,
    "eos_rate": 0.0,
    # /sim/faults is closed without a token (ha_agent/sim/server.py).
    "admin_token": "sim-test-token",
}
SIM_AUTH = {"Authorization": "Bearer sim-test-token"}


@dataclass
class SimHandle:
    url: str
    runner: web.AppRunner | None = None
    proc: subprocess.Popen[bytes] | None = None

    async def faults(self, **knobs: Any) -> None:
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{self.url}/sim/faults", json=knobs, headers=SIM_AUTH, timeout=5)
            r.raise_for_status()

    async def clear_faults(self) -> None:
        async with httpx.AsyncClient() as client:
            r = await client.delete(f"{self.url}/sim/faults", headers=SIM_AUTH, timeout=5)
            r.raise_for_status()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def sim_in_process(name: str = "sim", **overrides: Any) -> AsyncIterator[SimHandle]:
    settings = SimSettings(**{**FAST, "instance_name": name, **overrides})
    app = create_app(settings)
    ssl_context = serving_ssl(app, settings)  # as `sglang-ha-sim --ssl-certfile ...`
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    scheme = "https" if ssl_context is not None else "http"
    handle = SimHandle(url=f"{scheme}://127.0.0.1:{port}", runner=runner)
    try:
        yield handle
    finally:
        await handle.stop()


class ExitedWhileStarting(Exception):
    """The simulator process died before its /health answered 200."""


@contextlib.contextmanager
def sim_process(
    name: str = "sim", port: int | None = None, log_file: str | None = None, **env_overrides: str
) -> Iterator[SimHandle]:
    """A simulator process; its stderr appended to `log_file` (as supervisord keeps an
    engine's) when given."""
    port = port or free_port()
    env = {**os.environ, **{f"SIM_{k.upper()}": str(v) for k, v in FAST.items()}}
    env.update({"SIM_INSTANCE_NAME": name, **env_overrides})
    with open(log_file or os.devnull, "ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ha_agent.sim", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    handle = SimHandle(url=f"http://127.0.0.1:{port}", proc=proc)
    try:
        wait_until(
            # SGLang's /health answers after its first 1 s look for output.
            lambda: (
                proc.poll() is not None
                or httpx.get(f"{handle.url}/health", timeout=5).status_code == 200
            ),
            timeout=20,
            what="simulator process to start",
        )
        if proc.poll() is not None:
            raise ExitedWhileStarting(f"simulator {name} exited while starting ({proc.returncode})")
        yield handle
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a frozen one could not act on SIGTERM
        stop_process(proc)
