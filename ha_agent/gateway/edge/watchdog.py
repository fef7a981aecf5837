"""Gray-failure detection for the relay, as the agent does for engines.

A relay worker whose process is alive but whose event loop no longer runs (SIGSTOP,
a blocked loop, a deadlock) still owns its socket: the kernel keeps accepting Nginx's
connections for it, and Nginx then waits on them for up to GATEWAY_READ_TIMEOUT.
Liveness of the process says nothing; only progress of its loop does.

So each worker touches `<heartbeat_dir>/<index>` (its pid inside) every
`heartbeat_interval` from its event loop (`beat`), and the watchdog, a process of
its own under the gateway's supervisord, acts on a file older than `stall_limit`:

- it takes that worker's socket out of Nginx's reach by renaming it (`relay-<i>.sock`
  -> `relay-<i>.sock.frozen`): Nginx's next connect fails at once (no such file) and
  `proxy_next_upstream` moves the request to another worker (or, none left, to the
  nodes directly), while the requests the frozen worker holds wait for it and complete
  when it resumes. No Nginx reload: a reload closes the clients' idle keep-alive
  connections, and a client that sends on one at that instant loses its request
  (measured: 9 of 937 in a 12 s freeze). Nginx keeps no idle connections to the relay
  workers (no upstream `keepalive`), or it would send on one to the frozen worker.
  Not killed at once, on purpose: a kill cuts the streams the worker is sending
  (Nginx re-sends only the requests that had no response head yet), which a freeze
  that ends leaves whole;
- once its heartbeat moves again, its socket gets its name back (the same listening
  socket: a rename keeps it) and it is in the rotation again;
- still frozen after `stall_kill_after` (30 s), it is killed and supervisord starts
  it again (the new process binds a fresh socket; the old one's renamed file is
  removed): a worker stuck for good must not hold its requests forever.

Where the workers share one port (no `relay_worker_socket_dir`), there is no rotation
to leave, and a frozen worker is killed at once.

The watchdog records RELAY_WORKER_STALLED and RELAY_WORKER_RECOVERED in the HA log
and counts `sglang_ha_relay_worker_stalls_total` (summed with the workers' metrics
through PROMETHEUS_MULTIPROC_DIR); the SglangHaRelayWorkerStalled alert reads it.
Being the gateway's one housekeeping process, it also keeps Nginx's access log to a
size (gateway/edge/access_log.py) and, with TLS at the edge, hands Nginx a certificate
changed on disk (gateway/edge/tls_reload.py).
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
from ha_agent.atomic_file import write_atomic
from ha_agent.config import EdgeTlsSettings, RelaySettings
from ha_agent.dcs.base import LeaseStore
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from ha_agent.events import EventLog
from ha_agent.gateway.edge.access_log import AccessLogRotator
from ha_agent.gateway.edge.nginx_sync import relay_worker_socket
from ha_agent.gateway.edge.tls_reload import CertificateWatcher

log = logging.getLogger(__name__)

ACCESS_LOG_CHECK_INTERVAL = 5.0  # s; a flood writes a few MB/s at most
# A frozen worker's socket, renamed out of Nginx's reach until the worker beats again.
HIDDEN_SUFFIX = ".frozen"


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


# Past the moment a heartbeat turns stale: timers may fire a little early.
LOOK_SLACK = 0.005


@dataclass(frozen=True)
class Stall:
    index: str
    pid: int
    age: float


@dataclass(frozen=True)
class _Frozen:
    pid: int
    since: float  # when it last beat


def _pid(heartbeat: Path) -> int | None:
    try:
        return int(heartbeat.read_text())
    except (OSError, ValueError):
        return None


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


def oldest_heartbeat_age(heartbeat_dir: Path, now: Callable[[], float] = time.time) -> float | None:
    """The age of the stalest heartbeat in the folder, None without any."""
    try:
        ages = [_age(e.path, now) for e in os.scandir(heartbeat_dir) if not e.name.startswith(".")]
    except OSError:
        return None
    return max((a for a in ages if a is not None), default=None)


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
        pid = _pid(Path(entry.path))
        if pid is None:
            continue
        if age is not None and age > limit and _alive(pid):
            found.append(Stall(entry.name, pid, age))
    return found


class WatchdogService:
    """Looks at the heartbeats when the stalest could first pass the stall limit (a
    tenth of it while a worker is out of the rotation); acts on the frozen."""

    def __init__(
        self,
        settings: RelaySettings,
        store: LeaseStore | None = None,
        kill: Callable[[int, int], None] = os.kill,
        clock: Callable[[], float] = time.time,
        tls: EdgeTlsSettings | None = None,
    ) -> None:
        if settings.heartbeat_dir is None:
            raise ValueError("the relay watchdog needs HA_HEARTBEAT_DIR (the workers' heartbeats)")
        self.dir = settings.heartbeat_dir
        self.limit = settings.stall_limit
        self.kill_after = settings.stall_kill_after
        self.socket_dir = settings.relay_worker_socket_dir
        self.store = store or RedisLeaseStore(settings, retry_timeout=0.5)
        self.events = EventLog(settings.ha_log, "relay", self.store)
        self.kill, self.clock = kill, clock
        self.down: dict[str, _Frozen] = {}  # worker index -> the frozen process
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
        self.tls = tls if tls is not None else EdgeTlsSettings()
        self.certificate = (
            CertificateWatcher(self.tls.tls_cert, self.tls.tls_key, self.tls.tls_pair_file)
            if self.tls.tls_enabled
            else None
        )

    @property
    def rotates(self) -> bool:
        """Whether a frozen worker can leave Nginx's rotation (a socket each)."""
        return self.socket_dir is not None

    async def check(self) -> list[Stall]:
        """One look: frozen workers out of the rotation (or killed), beating ones back."""
        now = self.clock()
        found = stalled(self.dir, self.limit, now=self.clock)
        for stall in found:
            first = self.down.get(stall.index)
            if first is None:
                self.down[stall.index] = _Frozen(stall.pid, now - stall.age)
                self.stalls.inc()
                if self.rotates:
                    self._hide(stall.index)
                action = "out of Nginx's rotation" if self.rotates else "killed"
                self._say(
                    ev.RELAY_WORKER_STALLED, stall, f"no heartbeat for {stall.age:.1f}s; {action}"
                )
                if not self.rotates:
                    self._kill(stall)
            elif now - first.since >= self.kill_after and stall.pid not in self._killed:
                self._say(
                    ev.RELAY_WORKER_STALLED,
                    stall,
                    f"still frozen after {stall.age:.0f}s; killed, supervisord restarts it",
                )
                self._kill(stall)
        frozen = {s.index for s in found}
        for index in [i for i in self.down if i not in frozen and self._beating(i)]:
            was = self.down.pop(index)
            if self.rotates:
                self._show(index, resumed=_pid(self.dir / index) == was.pid)
            self.events.emit(
                ev.RELAY_WORKER_RECOVERED,
                f"relay worker {index}: beating again; back in Nginx's rotation",
            )
        return found

    def _socket(self, index: str) -> Path:
        assert self.socket_dir is not None
        return Path(relay_worker_socket(self.socket_dir, int(index)))

    def _hide(self, index: str) -> None:
        """Out of Nginx's reach: a connect finds no such file and moves on at once."""
        path = self._socket(index)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, path.with_name(path.name + HIDDEN_SUFFIX))

    def _show(self, index: str, resumed: bool) -> None:
        """The same process resumed: its socket gets its name back. A new process (the
        old one was killed) has bound a fresh socket: the old one's file goes."""
        path = self._socket(index)
        hidden = path.with_name(path.name + HIDDEN_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            if resumed and not path.exists():
                os.replace(hidden, path)
            else:
                os.unlink(hidden)

    def _say(self, event: str, stall: Stall, what: str) -> None:
        self.events.emit(event, f"relay worker {stall.index} (pid {stall.pid}): {what}")
        log.warning("relay worker %s (pid %d): %s", stall.index, stall.pid, what)

    def _kill(self, stall: Stall) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.kill(stall.pid, signal.SIGKILL)  # works on a stopped process too
        self._killed.add(stall.pid)

    def next_look(self) -> float:
        """Seconds until the next look. A wake-up costs this process 0.15-0.45 ms of
        CPU on the 2-core dev VM, so looking every tenth of the limit (16 times a
        second) made the idle watchdog cost as much CPU as a relay worker. No worker can
        be found stale before its last beat is `limit` old, so the watchdog sleeps
        until the stalest one could be (about twice a second while all beat), never
        longer than the limit (a new worker's file) nor shorter than a tenth of it (a
        dead worker's stale file, supervisord's to replace). While a worker is out of
        the rotation, its return and its kill are watched every tenth of the limit."""
        tick = self.limit / 10
        if self.down:
            return tick
        oldest = oldest_heartbeat_age(self.dir, self.clock)
        if oldest is None:
            return self.limit
        return min(max(self.limit - oldest + LOOK_SLACK, tick), self.limit)

    def _beating(self, index: str) -> bool:
        age = _age(self.dir / index, self.clock)
        return age is not None and age <= self.limit

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
                await asyncio.wait_for(self._stop.wait(), self.next_look())

    async def start(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._run()),
            asyncio.ensure_future(self.events.forward(self._stop)),
            asyncio.ensure_future(self.access_log.run(self._stop, ACCESS_LOG_CHECK_INTERVAL)),
        ]
        if self.certificate is not None:
            self._tasks.append(
                asyncio.ensure_future(self.certificate.run(self._stop, self.tls.tls_check_interval))
            )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        self.events.close()
