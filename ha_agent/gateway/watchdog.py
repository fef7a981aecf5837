"""Gray-failure detection for the relay, as the agent does for engines.

A relay worker whose process is alive but whose event loop no longer runs (SIGSTOP,
a blocked loop, a deadlock) still owns its share of the SO_REUSEPORT port: the
kernel keeps accepting Nginx's connections for it, and Nginx then waits on them for
up to GATEWAY_READ_TIMEOUT. Liveness of the process says nothing; only progress of
its loop does.

So each worker touches `<heartbeat_dir>/<index>` (its pid inside) every
`heartbeat_interval` from its event loop (`beat`), and the watchdog, a process of
its own under the gateway's supervisord, kills a worker whose file is older than
`stall_limit`. Killing is the way out that needs no cooperation from the frozen
process: its sockets close, the connections waiting in its accept queue and the
requests it held are reset, Nginx sends what reached no engine to the next upstream
(another worker, or the nodes directly when none is left), and supervisord starts
the worker again. A stream that worker carried is cut, as with a crash.

The watchdog records RELAY_WORKER_STALLED in the HA log and counts
`sglang_ha_relay_worker_stalls_total` (summed with the workers' metrics through
PROMETHEUS_MULTIPROC_DIR); the SglangHaRelayWorkerStalled alert reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from ha_agent import events as ev
from ha_agent.config import RelaySettings
from ha_agent.dcs.base import LeaseStore
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from ha_agent.events import EventLog

log = logging.getLogger(__name__)


def _announce(heartbeat_dir: Path, index: int) -> Path:
    """This worker's heartbeat file, with its pid: a restarted worker replaces the old
    one's at once, so the watchdog never judges a new process by an old age."""
    heartbeat_dir.mkdir(parents=True, exist_ok=True)
    path = heartbeat_dir / str(index)
    tmp = heartbeat_dir / f".{index}.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, path)
    return path


async def beat(heartbeat_dir: Path, index: int, interval: float, stop: asyncio.Event) -> None:
    """A worker's heartbeat: its file's mtime moves while its event loop runs (a
    utime on a tmpfs, on the loop itself on purpose: the loop's progress is the sign)."""
    path = _announce(heartbeat_dir, index)
    while not stop.is_set():
        with contextlib.suppress(OSError):
            os.utime(path)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


@dataclass(frozen=True)
class Stall:
    index: str
    pid: int
    age: float


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stalled(heartbeat_dir: Path, limit: float, now: Callable[[], float] = time.time) -> list[Stall]:
    """The workers whose heartbeat is older than `limit` and whose process still lives
    (a dead one is supervisord's to restart; its next heartbeat replaces the file)."""
    found = []
    try:
        entries = [e for e in os.scandir(heartbeat_dir) if not e.name.startswith(".")]
    except OSError:
        return []
    for entry in entries:
        try:
            age = now() - entry.stat().st_mtime
            pid = int(Path(entry.path).read_text())
        except (OSError, ValueError):
            continue
        if age > limit and _alive(pid):
            found.append(Stall(entry.name, pid, age))
    return found


class WatchdogService:
    """Checks the heartbeats every tenth of the stall limit; kills the frozen."""

    def __init__(
        self,
        settings: RelaySettings,
        store: LeaseStore | None = None,
        kill: Callable[[int, int], None] = os.kill,
    ) -> None:
        if settings.heartbeat_dir is None:
            raise ValueError("the relay watchdog needs HA_HEARTBEAT_DIR (the workers' heartbeats)")
        self.dir = settings.heartbeat_dir
        self.limit = settings.stall_limit
        self.store = store or RedisLeaseStore(settings, retry_timeout=0.5)
        self.events = EventLog(settings.ha_log, "relay", self.store)
        self.kill = kill
        # Its own registry: the relay workers' /metrics sums this process's file
        # (PROMETHEUS_MULTIPROC_DIR), the watchdog serves nothing itself.
        self.stalls = Counter(
            "sglang_ha_relay_worker_stalls",
            "Relay workers killed by the watchdog because their event loop stopped running.",
            registry=CollectorRegistry(),
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []

    def check(self) -> list[Stall]:
        """One look: kill every frozen worker, and say so."""
        found = stalled(self.dir, self.limit)
        for stall in found:
            with contextlib.suppress(ProcessLookupError):
                self.kill(stall.pid, signal.SIGKILL)  # works on a stopped process too
            self.stalls.inc()
            self.events.emit(
                ev.RELAY_WORKER_STALLED,
                f"relay worker {stall.index} (pid {stall.pid}): no heartbeat for"
                f" {stall.age:.1f}s; killed, supervisord restarts it",
            )
            log.warning(
                "relay worker %s (pid %d) frozen for %.1fs: killed",
                stall.index,
                stall.pid,
                stall.age,
            )
        return found

    async def _run(self) -> None:
        log.info("relay watchdog on %s: a worker silent for %.1fs is killed", self.dir, self.limit)
        while not self._stop.is_set():
            self.check()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.limit / 8)

    async def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self.events.forward(self._stop)),
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        self.events.close()
