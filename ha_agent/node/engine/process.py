"""What supervisord knows about the engine process: running, exited, how it died.

Why: a crash and an OOM kill look the same over HTTP (connection refused);
supervisord saw the exit status, and the engine's stderr says whether memory ran out.
"""

from __future__ import annotations

import asyncio
import re
import xmlrpc.client
from dataclasses import dataclass
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

# The engine launcher prints this to stderr before it execs the engine.
START_MARKER = "sglang-ha: engine starting"
_OOM_TEXT = re.compile(r"out of memory|OutOfMemoryError|oom-kill", re.IGNORECASE)
_EXIT_LINE = re.compile(r"exited: (?P<name>\S+) \((?P<how>[^)]*)\)")


@dataclass(frozen=True)
class ProcessState:
    name: str
    state: str  # supervisord's statename: RUNNING, STARTING, BACKOFF, EXITED, FATAL, STOPPED...
    pid: int
    exit_how: str = ""  # "terminated by SIGKILL", "exit status 1"
    oom: bool = False

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    def describe(self) -> str:
        if self.running:
            return f"running (pid {self.pid})"
        how = f", last exit: {self.exit_how}" if self.exit_how else ""
        oom = " — out of memory" if self.oom else ""
        return f"{self.state.lower()}{how}{oom}"


class ProcessWatch:
    def __init__(self, socket_path: str, program: str) -> None:
        self.program = program
        transport = SupervisorTransport(None, None, f"unix://{socket_path}")
        self._rpc: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        self._last_pid = 0
        self._last_exit = ""
        self._last_oom = False

    def _read(self) -> ProcessState:
        info = self._rpc.supervisor.getProcessInfo(self.program)
        state, pid = str(info["statename"]), int(info["pid"])
        if state != "RUNNING" and (self._last_pid or not self._last_exit):
            # The process just went away: find out how, once.
            self._last_exit = self._exit_how()
            tail = str(self._rpc.supervisor.tailProcessStderrLog(self.program, 0, 16384)[0])
            # Only what this run printed: the launcher marks each start.
            tail = tail.rsplit(START_MARKER, 1)[-1]
            self._last_oom = bool(_OOM_TEXT.search(tail))
        if state == "RUNNING" and pid != self._last_pid:
            self._last_oom = False
        self._last_pid = pid if state == "RUNNING" else 0
        return ProcessState(self.program, state, pid, self._last_exit, self._last_oom)

    def _exit_how(self) -> str:
        log = str(self._rpc.supervisor.readLog(-16384, 0))
        found = [
            m.group("how") for m in _EXIT_LINE.finditer(log) if m.group("name") == self.program
        ]
        return found[-1] if found else ""

    async def read(self, timeout: float) -> ProcessState:
        return await asyncio.wait_for(asyncio.to_thread(self._read), timeout)
