"""Restarting the engine on the operator's request (`sglang-ha restart NODE`).

The node image runs the engine under supervisord (images/node/supervisord.conf);
the agent asks it over its unix socket, the same one `SupervisorWatch`
(ha_agent/node/engine/process.py) reads the engine's state from. In sidecar mode
the engine is not ours to restart, and there is no such control.
"""

from __future__ import annotations

import asyncio
import xmlrpc.client
from typing import Any

from supervisor.xmlrpc import SupervisorTransport


class EngineControlError(Exception):
    """supervisord did not do what was asked."""


class EngineControl:
    def __init__(self, socket_path: str, program: str) -> None:
        self.socket_path = socket_path
        self.program = program

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

    async def restart(self, timeout: float = 90.0) -> int:
        """Stop the engine (it drains), start it again; the new process's pid.
        Health is the monitor's business: the caller waits for ENGINE_HEALTHY."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._restart), timeout)
        except asyncio.TimeoutError as exc:
            raise EngineControlError(f"supervisord did not restart it within {timeout:g}s") from exc
