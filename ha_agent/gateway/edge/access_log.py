"""Nginx's access log kept to a bounded size, so that a flood of requests cannot fill
the gateway's log volume.

Nginx never rotates its own files. As logrotate does, without copytruncate (which
loses the lines written between the copy and the truncate): the file is renamed
(access.log -> access.log.1 -> ... -> access.log.<keep>, the oldest dropped) and the
Nginx master is told to reopen its logs (SIGUSR1, what `nginx -s reopen` sends).
Until it has, Nginx keeps writing to the renamed file, so no line is lost. Run by the
relay watchdog, the gateway's one housekeeping process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from ha_agent.gateway.edge.periodic import every

log = logging.getLogger(__name__)


def nginx_master(pid_file: Path) -> int | None:
    """The Nginx master's pid from its pid file (None while Nginx is not up)."""
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


class AccessLogRotator:
    def __init__(
        self,
        path: Path,
        max_bytes: int,
        keep: int,
        pid_file: Path,
        signal_process: Callable[[int, int], None] = os.kill,
    ) -> None:
        self.path, self.max_bytes, self.keep, self.pid_file = path, max_bytes, keep, pid_file
        self.signal_process = signal_process

    def check(self) -> bool:
        """Rotate if the log is past its size; True if it was rotated."""
        try:
            size = self.path.stat().st_size
        except OSError:
            return False  # none yet: Nginx creates it with its first request
        if size <= self.max_bytes:
            return False
        pid = nginx_master(self.pid_file)
        if pid is None:
            return False  # renamed now, nothing would reopen it: wait for Nginx
        for n in range(self.keep, 0, -1):
            older = self._numbered(n - 1) if n > 1 else self.path
            with contextlib.suppress(FileNotFoundError):
                os.replace(older, self._numbered(n))
        try:
            self.signal_process(pid, signal.SIGUSR1)
        except ProcessLookupError:
            log.warning("access log rotated, but Nginx (pid %d) is gone: it reopens on start", pid)
        log.info("access log rotated at %d bytes (keeping %d)", size, self.keep)
        return True

    def _numbered(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        await every(interval, self.check, stop, "access log rotation")
