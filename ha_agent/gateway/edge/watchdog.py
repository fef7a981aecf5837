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

A stale heartbeat is not always a frozen loop. On a loaded machine a worker can be
*starved*: runnable, but given no CPU for the stall limit (seen on the 2-core dev VM:
both workers silent 0.6 s at once, both taken out, and Nginx's last-resort route to
the nodes carried 44 streams past the relay's admission). Taking a starved worker out
only moves its load elsewhere, and with every worker out, past admission. So at each
look the watchdog reads each worker's `/proc/<pid>/schedstat` (its main thread, the
one that runs the event loop: time on a CPU, time runnable but waiting for one), and
keeps the latest reading taken before the worker's last beat. A stale worker whose
wait grew by at least half of its silence since then is starved: it stays in the
rotation, logged once per episode and counted (`sglang_ha_relay_worker_starved_total`).
A stopped loop (SIGSTOP) or one blocked in a syscall or on a lock is not runnable and
gains neither time; one spinning on a CPU of its own gains run time and waits little.
One thread is either running or waiting, so "waited at least half" also means "ran
at most half". A loop spinning on a CPU it gets less than half of waits more than
half and cannot be told from a starved busy one (a spinner under `docker run --cpus
0.3` waited 84% of 2 s on the dev VM), hence the bound: starvation excuses a
heartbeat only until it is `stall_starved_limit` old (three stall limits unless set);
past that, and for a worker whose schedstat cannot be read, the rule above holds.

The watchdog can be starved too, or the whole VM paused (hypervisor steal): then it
wakes after it meant to, and every heartbeat looks older by that lateness, which no
worker's loop caused. A look takes its own lateness (when it ran against when it was
planned) off every heartbeat's age; a worker that is really frozen is found by the
next, punctual look, a tenth of the stall limit later.

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
    utime on a tmpfs, on the loop itself on purpose: the loop's progress is the sign).

    A timer callback, not a loop around `wait_for`: at 10 beats a second each
    `wait_for` made a task and a timeout, most of the beat's idle CPU."""
    path = _announce(heartbeat_dir, index)
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None

    def touch() -> None:
        nonlocal timer
        with contextlib.suppress(OSError):
            os.utime(path)
        timer = loop.call_later(interval, touch)

    touch()
    try:
        await stop.wait()
    finally:
        if timer is not None:
            timer.cancel()


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


@dataclass(frozen=True)
class SchedStat:
    """A thread's scheduler times so far, s."""

    run: float  # on a CPU
    wait: float  # runnable, waiting for a CPU


def read_schedstat(pid: int) -> SchedStat | None:
    """`/proc/<pid>/schedstat` (`run_ns wait_ns timeslices`), None where it cannot be read.
    It is the process's main thread's, the one that runs a relay worker's event loop."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            run_ns, wait_ns, _ = f.read().split()
        return SchedStat(int(run_ns) / 1e9, int(wait_ns) / 1e9)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Sample:
    at: float
    stat: SchedStat


@dataclass
class _Track:
    """One worker's schedstat as the looks saw it."""

    pid: int
    latest: _Sample | None = None
    # The latest sample taken no later than the worker's last beat: the deltas from it
    # cover the whole stale span.
    before_beat: _Sample | None = None


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


@dataclass(frozen=True)
class Heartbeat:
    """A worker's heartbeat file as one look read it."""

    index: str
    pid: int
    beat_at: float  # its mtime: the worker's last beat (time.time)


def read_heartbeats(heartbeat_dir: Path) -> list[Heartbeat]:
    """Every heartbeat in the folder with its pid and last beat, read once per look
    (one not readable whole, a worker starting or gone, is left out)."""
    try:
        entries = [e for e in os.scandir(heartbeat_dir) if not e.name.startswith(".")]
    except OSError:
        return []
    beats = []
    for entry in entries:
        pid = _pid(Path(entry.path))
        try:
            beat_at = os.stat(entry.path).st_mtime
        except OSError:
            continue
        if pid is not None:
            beats.append(Heartbeat(entry.name, pid, beat_at))
    return beats


def stalled(
    heartbeat_dir: Path,
    limit: float,
    now: Callable[[], float] = time.time,
    beats: list[Heartbeat] | None = None,
) -> list[Stall]:
    """The workers whose heartbeat is older than `limit` and whose process still lives
    (a dead one is supervisord's to restart; its next heartbeat replaces the file).
    `beats`: the folder as already read by this look."""
    at = now()
    return [
        Stall(b.index, b.pid, at - b.beat_at)
        for b in (read_heartbeats(heartbeat_dir) if beats is None else beats)
        if at - b.beat_at > limit and _alive(b.pid)
    ]


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
        schedstat: Callable[[int], SchedStat | None] = read_schedstat,
    ) -> None:
        if settings.heartbeat_dir is None:
            raise ValueError("the relay watchdog needs HA_HEARTBEAT_DIR (the workers' heartbeats)")
        self.dir = settings.heartbeat_dir
        self.limit = settings.stall_limit
        self.kill_after = settings.stall_kill_after
        self.starved_limit = (
            settings.stall_starved_limit
            if settings.stall_starved_limit is not None
            else 3 * settings.stall_limit
        )
        self.socket_dir = settings.relay_worker_socket_dir
        self.store = store or RedisLeaseStore(settings, retry_timeout=0.5)
        self.events = EventLog(settings.ha_log, "relay", self.store)
        self.kill, self.clock, self.schedstat = kill, clock, schedstat
        self.down: dict[str, _Frozen] = {}  # worker index -> the frozen process
        self.starved: dict[str, _Frozen] = {}  # stale but waiting for a CPU: left in
        self._tracks: dict[str, _Track] = {}
        self._killed: set[int] = set()
        self.beats: list[Heartbeat] = []  # the folder as the last look read it
        # Its own registry: the relay workers' /metrics sums this process's file
        # (PROMETHEUS_MULTIPROC_DIR), the watchdog serves nothing itself.
        self.stalls = Counter(
            "sglang_ha_relay_worker_stalls",
            "Relay workers found frozen by the watchdog (their event loop stopped).",
            registry=CollectorRegistry(),
        )
        self.starvations = Counter(
            "sglang_ha_relay_worker_starved",
            "Relay workers whose heartbeat went stale while they waited for a CPU, left in"
            " Nginx's rotation (starved, not frozen).",
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

    async def check(self, late: float = 0.0) -> list[Stall]:
        """One look: frozen workers out of the rotation (or killed), starved ones left in,
        beating ones back. `late`: how long after its planned wake-up this look runs;
        that time is taken off every heartbeat's age (see `_run`)."""
        now = self.clock()
        seen = now - late
        beats = self.beats = read_heartbeats(self.dir)
        self._sample(beats, now)
        stale = stalled(self.dir, self.limit, now=lambda: seen, beats=beats)
        excused = {s.index for s in stale if self._excused(s, now, seen)}
        found = [s for s in stale if s.index not in excused]
        for stall in found:
            first = self.down.get(stall.index)
            if first is None:
                self.down[stall.index] = _Frozen(stall.pid, seen - stall.age)
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
        for index in [i for i in self.down if i not in frozen and self._beating(i, seen)]:
            was = self.down.pop(index)
            if self.rotates:
                self._show(index, resumed=_pid(self.dir / index) == was.pid)
            self.events.emit(
                ev.RELAY_WORKER_RECOVERED,
                f"relay worker {index}: beating again; back in Nginx's rotation",
            )
        for index in [i for i in self.starved if i not in excused]:
            was = self.starved.pop(index)
            if index not in frozen and self._beating(index, seen):
                log.info(
                    "relay worker %s (pid %d): beating again after %.1fs starved of CPU",
                    index,
                    was.pid,
                    seen - was.since,
                )
        return found

    def _sample(self, beats: list[Heartbeat], now: float) -> None:
        """Every worker's schedstat at this look. The previous look's reading becomes the
        one before its last beat when the worker beat after that look."""
        for beat in beats:
            pid = beat.pid
            track = self._tracks.get(beat.index)
            if track is None or track.pid != pid:  # a new process: nothing to compare with
                track = self._tracks[beat.index] = _Track(pid)
            elif track.latest is not None and track.latest.at <= beat.beat_at:
                track.before_beat = track.latest
            stat = self.schedstat(pid)
            track.latest = _Sample(now, stat) if stat is not None else None
            if stat is None:
                track.before_beat = None

    def _excused(self, stall: Stall, now: float, seen: float) -> bool:
        """Whether a stale heartbeat is starvation, not a freeze: over its stale span the
        worker's loop thread was runnable but waiting for a CPU at least half the time,
        and not for longer than `starved_limit`. A stopped or blocked loop gains neither
        wait nor run time; a spinning one gains run time, at most the half of the span
        that it did not wait (one thread is either running or waiting)."""
        track = self._tracks.get(stall.index)
        if (
            stall.age > self.starved_limit
            or stall.index in self.down
            or track is None
            or track.pid != stall.pid
            or track.before_beat is None
            or track.latest is None
            or track.latest.at != now
        ):
            return False
        was, last = track.before_beat.stat, track.latest.stat
        waited, ran = last.wait - was.wait, last.run - was.run
        if waited < stall.age / 2:
            return False
        if stall.index not in self.starved:
            self.starved[stall.index] = _Frozen(stall.pid, seen - stall.age)
            self.starvations.inc()
            log.warning(
                "relay worker %s (pid %d): no heartbeat for %.1fs, but %.2fs of it waiting"
                " for a CPU (%.2fs on one): starved, not frozen; %s for up to %.1fs",
                stall.index,
                stall.pid,
                stall.age,
                waited,
                ran,
                "left in Nginx's rotation" if self.rotates else "not killed",
                self.starved_limit,
            )
        return True

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

    def next_look(self, beats: list[Heartbeat] | None = None) -> float:
        """Seconds until the next look. A wake-up costs this process 0.15-0.45 ms of
        CPU on the 2-core dev VM, so looking every tenth of the limit (16 times a
        second) made the idle watchdog cost as much CPU as a relay worker. No worker can
        be found stale before its last beat is `limit` old, so the watchdog sleeps
        until the stalest one could be (about twice a second while all beat), never
        longer than the limit (a new worker's file) nor shorter than a tenth of it (a
        dead worker's stale file, supervisord's to replace). While a worker is out of
        the rotation, its return and its kill are watched every tenth of the limit.
        `beats`: the folder as the look just made read it (else it is read now)."""
        tick = self.limit / 10
        if self.down or self.starved:
            return tick
        now = self.clock()
        beats = read_heartbeats(self.dir) if beats is None else beats
        oldest = max((now - b.beat_at for b in beats), default=None)
        if oldest is None:
            return self.limit
        return min(max(self.limit - oldest + LOOK_SLACK, tick), self.limit)

    def _beating(self, index: str, seen: float) -> bool:
        age = _age(self.dir / index, lambda: seen)
        return age is not None and age <= self.limit

    async def _run(self) -> None:
        log.info(
            "relay watchdog on %s: a worker silent for %.1fs is %s",
            self.dir,
            self.limit,
            "taken out of Nginx's rotation" if self.rotates else "killed",
        )
        late = 0.0
        while not self._stop.is_set():
            try:
                await self.check(late)
            except Exception:  # never let one bad look end the watch
                log.exception("BUG: relay watchdog check failed")
            delay = self.next_look(self.beats)
            due = self.clock() + delay
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            late = max(0.0, self.clock() - due)

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
