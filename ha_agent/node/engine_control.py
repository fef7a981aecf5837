"""Restarting the engine: on the operator's request (`sglang-ha restart NODE`), or
killed and started again by its agent when it is hung (node/engine_restart.py).

The node image runs the engine under supervisord (images/node/supervisord.conf);
the agent asks it over its unix socket, the same one `SupervisorWatch`
(ha_agent/node/engine/process.py) reads the engine's state from. In sidecar mode
the engine is not ours to restart, and there is no such control.
"""

from __future__ import annotations

import asyncio
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any

from supervisor.xmlrpc import SupervisorTransport


class EngineControlError(Exception):
    """supervisord did not do what was asked."""


# supervisord's fault codes (supervisor/xmlrpc.py Faults) that a race can raise.
_NOT_RUNNING = 70
_ALREADY_STARTED = 60


class EngineControl:
    def __init__(self, socket_path: str, program: str) -> None:
        self.socket_path = socket_path
        self.program = program
        self.busy = False  # one restart at a time, operator's or automatic

    def _rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _restart(self) -> int:
        rpc = self._rpc()
        try:
            if rpc.supervisor.getProcessInfo(self.program)["statename"] in ("RUNNING", "STARTING"):
                # Waits for the engine to exit: stopwaitsecs lets it drain, then SIGKILL.
                rpc.supervisor.stopProcess(self.program, True)
            rpc.supervisor.startProcess(self.program, True)
            return int(rpc.supervisor.getProcessInfo(self.program)["pid"])
        except (OSError, xmlrpc.client.Error) as exc:
            raise EngineControlError(f"supervisord: {exc}") from exc

    async def restart(self, timeout: float = 90.0, hung: bool = False) -> int:
        """Stop the engine (it drains), start it again; the new process's pid. A hung
        engine is killed instead: its drain would never end (`kill_and_start`).
        Health is the monitor's business: the caller waits for ENGINE_HEALTHY."""
        if hung:
            return await self.kill_and_start(timeout)
        return await self._one_at_a_time(self._restart, timeout)

    async def kill_and_start(self, timeout: float) -> int:
        """SIGKILL the engine and have supervisord start a new one; its pid.

        Why not stop it: SGLang drains on SIGTERM with no deadline, and a hung engine's
        requests never finish, so a stop would wait out supervisord's stopwaitsecs; a
        stopped (SIGSTOP) process would not even see the SIGTERM. SGLang's children die
        with their parent (PR_SET_PDEATHSIG, `kill_itself_when_parent_died` in
        python/sglang/srt/utils/common.py), which frees the GPU for the new run."""
        deadline = time.monotonic() + timeout
        return await self._one_at_a_time(lambda: self._kill_and_start(deadline), timeout)

    async def _one_at_a_time(self, work: Callable[[], int], timeout: float) -> int:
        if self.busy:
            raise EngineControlError("a restart is already under way")
        self.busy = True
        try:
            return await asyncio.wait_for(asyncio.to_thread(work), timeout)
        except asyncio.TimeoutError as exc:
            raise EngineControlError(f"supervisord did not restart it within {timeout:g}s") from exc
        finally:
            self.busy = False

    def _kill_and_start(self, deadline: float) -> int:
        rpc = self._rpc()
        try:
            info = rpc.supervisor.getProcessInfo(self.program)
            old = int(info["pid"])
            if info["statename"] in ("RUNNING", "STARTING") and old:
                try:
                    rpc.supervisor.signalProcess(self.program, "KILL")
                except xmlrpc.client.Fault as exc:
                    if exc.faultCode != _NOT_RUNNING:  # it died meanwhile: fine
                        raise
            # autorestart=true (images/node/supervisord.conf) starts an EXITED one again
            # by itself at its next tick; start it here only where supervisord will not.
            exited_at: float | None = None
            while time.monotonic() < deadline:
                info = rpc.supervisor.getProcessInfo(self.program)
                pid, state = int(info["pid"]), info["statename"]
                if state in ("RUNNING", "STARTING") and pid and pid != old:
                    return pid
                if state == "EXITED" and exited_at is None:
                    exited_at = time.monotonic()
                if state in ("STOPPED", "FATAL") or (
                    exited_at is not None and time.monotonic() - exited_at > 1.0
                ):
                    try:
                        rpc.supervisor.startProcess(self.program, False)
                    except xmlrpc.client.Fault as exc:
                        if exc.faultCode != _ALREADY_STARTED:
                            raise
                time.sleep(0.1)
        except (OSError, xmlrpc.client.Error) as exc:
            raise EngineControlError(f"supervisord: {exc}") from exc
        raise EngineControlError("supervisord did not start a new engine in time")
