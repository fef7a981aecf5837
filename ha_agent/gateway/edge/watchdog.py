"""Gray-failure detection for the relay, as the agent does for engines.

A relay worker whose process is alive but whose event loop no longer runs (SIGSTOP,
a blocked loop, a deadlock) still owns its socket: the kernel keeps accepting Nginx's
connections for it, and Nginx then waits on them for up to GATEWAY_READ_TIMEOUT.
Liveness of the process says nothing; only progress of its loop does.

So each worker touches `<heartbeat_dir>/<index>` (its pid inside) every
`heartbeat_interval` from its event loop (`beat`), and the watchdog, a process of
its own under the gateway's supervisord, acts on a file older than `stall_limit`:

- it marks that worker's socket `down` in Nginx's list of relay workers and reloads
  Nginx: new requests go to the other workers (or, none left, to the nodes
  directly), while the requests the frozen worker holds wait for it and complete
  when it resumes. Not killed at once, on purpose: Nginx streams request bodies to
  the relay, and a body already sent cannot be re-sent, so a kill would turn every
  request the worker holds into an error (measured: 51 in a 12 s freeze);
- once its heartbeat moves again, the worker goes back into the rotation;
- still frozen after `stall_kill_after` (30 s), it is killed and supervisord starts
  it again: a worker stuck for good must not hold its requests forever.

Where the workers share one port (no `relay_worker_socket_dir`), there is no rotation
to leave, and a frozen worker is killed at once.

The watchdog records RELAY_WORKER_STALLED and RELAY_WORKER_RECOVERED in the HA log
and counts `sglang_ha_relay_worker_stalls_total` (summed with the workers' metrics
through PROMETHEUS_MULTIPROC_DIR); the SglangHaRelayWorkerStalled alert reads it.
Being the gateway's one housekeeping process, it also keeps Nginx's access log to a
size (gateway/edge/access_log.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from ha_agent import events as ev
from ha_agent.atomic_file import write_atomic
from ha_agent.config import RelaySettings
from ha_agent.dcs.base import LeaseStore
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from ha_agent.events import EventLog
from ha_agent.gateway.edge.access_log import AccessLogRotator
from ha_agent.gateway.edge.nginx_sync import (
    relay_worker_sockets,
    reload_nginx,
    render_relay_servers,
)

log = logging.getLogger(__name__)

ACCESS_LOG_CHECK_INTERVAL = 5.0  # s; a flood writes a few MB/s at most


def _announce(heartbeat_dir: Path, index: int) -> Path:
    """This worker's heartbeat file, with its pid: a restarted worker replaces the old
    one's at once, so the watchdog never judges a new process by an old age."""
    heartbeat_dir.mkdir(parents=True, exist_ok=True)
    path = heartbeat_dir / str(index)
    write_atomic(path, str(os.getpid()))
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


def _age(path: str | Path, now: Callable[[], float]) -> float | None:
    """Seconds since the heartbeat at `path` last moved, None without one."""
    try:
        return now() - os.stat(path).st_mtime
    except OSError:
        return None


def stalled(heartbeat_dir: Path, limit: float, now: Callable[[], float] = time.time) -> list[Stall]:
    """The workers whose heartbeat is older than `limit` and whose process still lives
    (a dead one is supervisord's to restart; its next heartbeat replaces the file)."""
    found = []
    try:
        entries = [e for e in os.scandir(heartbeat_dir) if not e.name.startswith(".")]
    except OSError:
        return []
    for entry in entries:
        age = _age(entry.path, now)
        try:
            pid = int(Path(entry.path).read_text())
        except (OSError, ValueError):
            continue
        if age is not None and age > limit and _alive(pid):
            found.append(Stall(entry.name, pid, age))
    return found


class WatchdogService:
    """Checks the heartbeats every tenth of the stall limit; acts on the frozen."""

    def __init__(
        self,
        settings: RelaySettings,
        store: LeaseStore | None = None,
        kill: Callable[[int, int], None] = os.kill,
        reload: Callable[[str, str], Awaitable[None]] = reload_nginx,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if settings.heartbeat_dir is None:
            raise ValueError("the relay watchdog needs HA_HEARTBEAT_DIR (the workers' heartbeats)")
        self.dir = settings.heartbeat_dir
        self.limit = settings.stall_limit
        self.kill_after = settings.stall_kill_after
        socket_dir, workers = settings.relay_worker_socket_dir, settings.relay_workers
        self.servers = relay_worker_sockets(socket_dir, workers) if socket_dir else []
        self.nginx_file = settings.nginx_relay_file
        self.reload_command = settings.nginx_reload_command
        self.store = store or RedisLeaseStore(settings, retry_timeout=0.5)
        self.events = EventLog(settings.ha_log, "relay", self.store)
        self.kill, self.reload, self.clock = kill, reload, clock
        self.down: dict[str, float] = {}  # worker index -> when it last beat
        self._killed: set[int] = set()
        # Its own registry: the relay workers' /metrics sums this process's file
        # (PROMETHEUS_MULTIPROC_DIR), the watchdog serves nothing itself.
        self.stalls = Counter(
            "sglang_ha_relay_worker_stalls",
            "Relay workers found frozen by the watchdog (their event loop stopped).",
            registry=CollectorRegistry(),
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []
        # The gateway's other housekeeping: Nginx's access log kept to a size.
        self.access_log = AccessLogRotator(
            settings.access_log,
            settings.access_log_max_bytes,
            settings.access_log_keep,
            settings.nginx_pid_file,
        )

    @property
    def rotates(self) -> bool:
        """Whether a frozen worker can leave Nginx's rotation (a socket each)."""
        return bool(self.servers and self.nginx_file)

    async def check(self) -> list[Stall]:
        """One look: frozen workers out of the rotation (or killed), beating ones back."""
        now = self.clock()
        found = stalled(self.dir, self.limit, now=self.clock)
        changed = False
        for stall in found:
            if stall.index not in self.down:
                self.down[stall.index] = now - stall.age
                self.stalls.inc()
                changed = True
                action = "out of Nginx's rotation" if self.rotates else "killed"
                self._say(
                    ev.RELAY_WORKER_STALLED, stall, f"no heartbeat for {stall.age:.1f}s; {action}"
                )
                if not self.rotates:
                    self._kill(stall)
            elif now - self.down[stall.index] >= self.kill_after and stall.pid not in self._killed:
                self._say(
                    ev.RELAY_WORKER_STALLED,
                    stall,
                    f"still frozen after {stall.age:.0f}s; killed, supervisord restarts it",
                )
                self._kill(stall)
        frozen = {s.index for s in found}
        for index in [i for i in self.down if i not in frozen and self._beating(i)]:
            del self.down[index]
            changed = True
            self.events.emit(
                ev.RELAY_WORKER_RECOVERED,
                f"relay worker {index}: beating again; back in Nginx's rotation",
            )
        if changed and self.rotates:
            await self._publish()
        return found

    def _say(self, event: str, stall: Stall, what: str) -> None:
        self.events.emit(event, f"relay worker {stall.index} (pid {stall.pid}): {what}")
        log.warning("relay worker %s (pid %d): %s", stall.index, stall.pid, what)

    def _kill(self, stall: Stall) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.kill(stall.pid, signal.SIGKILL)  # works on a stopped process too
        self._killed.add(stall.pid)

    def _beating(self, index: str) -> bool:
        age = _age(self.dir / index, self.clock)
        return age is not None and age <= self.limit

    async def _publish(self) -> None:
        assert self.nginx_file is not None
        down = {self.servers[int(i)] for i in self.down if int(i) < len(self.servers)}
        await asyncio.to_thread(
            write_atomic, self.nginx_file, render_relay_servers(self.servers, down)
        )
        await self.reload(self.reload_command, f"relay workers down: {sorted(down) or 'none'}")

    async def _run(self) -> None:
        log.info(
            "relay watchdog on %s: a worker silent for %.1fs is %s",
            self.dir,
            self.limit,
            "taken out of Nginx's rotation" if self.rotates else "killed",
        )
        while not self._stop.is_set():
            try:
                await self.check()
            except Exception:  # never let one bad look end the watch
                log.exception("BUG: relay watchdog check failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.limit / 10)

    async def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self.events.forward(self._stop)),
            asyncio.ensure_future(self.access_log.run(self._stop, ACCESS_LOG_CHECK_INTERVAL)),
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        self.events.close()
