"""The relay watchdog (gateway/edge/watchdog.py): a worker whose event loop stops leaves
Nginx's rotation (its socket hidden) or, with no socket of its own, is killed; a running
one, a dead one and one that just started are left alone."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from ha_agent.config import RelaySettings
from ha_agent.gateway.edge.watchdog import (
    Heartbeat,
    SchedStat,
    WatchdogService,
    beat,
    read_heartbeats,
    read_schedstat,
    stalled,
)
from tests.support.fakes import FakeClock, FakeStore


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for a relay worker (the watchdog only sees its pid)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def heartbeat(
    directory: Path, index: int, pid: int, age: float, now: Callable[[], float] = time.time
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / str(index)
    path.write_text(str(pid))
    then = now() - age
    os.utime(path, (then, then))


async def test_a_worker_beats_while_its_loop_runs(tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(beat(tmp_path / "hb", 3, 0.01, stop))
    await asyncio.sleep(0.05)
    path = tmp_path / "hb" / "3"
    assert path.read_text() == str(os.getpid())
    first = path.stat().st_mtime_ns
    await asyncio.sleep(0.05)
    assert path.stat().st_mtime_ns > first, "the mtime moves while the loop runs"
    assert stalled(tmp_path / "hb", 0.5) == []
    stop.set()
    await asyncio.wait_for(task, 1.0)


def test_only_a_live_process_with_a_stale_heartbeat_is_stalled(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    heartbeat(tmp_path, 0, child.pid, age=5.0)
    heartbeat(tmp_path, 1, os.getpid(), age=0.0)  # beating
    heartbeat(tmp_path, 2, dead.pid, age=5.0)  # gone: supervisord's to restart
    (tmp_path / ".3.123").write_text("not yet renamed")
    found = stalled(tmp_path, 0.8)
    assert [(s.index, s.pid) for s in found] == [("0", child.pid)]
    assert found[0].age >= 5.0


def _watchdog(
    tmp_path: Path,
    clock: Callable[[], float] = time.time,
    schedstat: Callable[[int], SchedStat | None] = read_schedstat,
    **extra: object,
) -> WatchdogService:
    settings = RelaySettings(
        heartbeat_dir=tmp_path / "hb",
        stall_limit=0.8,
        ha_log=str(tmp_path / "ha.log"),
        **extra,  # type: ignore[arg-type]
    )
    return WatchdogService(settings, store=FakeStore(FakeClock()), clock=clock, schedstat=schedstat)


async def _answers(path: Path) -> str:
    """What a request over the Unix socket at `path` gets, as Nginx would connect."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    return data.decode().rsplit("\r\n", 1)[-1]


@pytest.fixture
async def worker_socket(tmp_path: Path) -> AsyncIterator[Path]:
    """Relay worker 1's own socket, served as the worker serves it (aiohttp UnixSite)."""
    sockets = tmp_path / "sock"
    sockets.mkdir()
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="worker 1")

    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(sockets / "relay-1.sock")).start()
    yield sockets
    await runner.cleanup()


async def test_a_frozen_worker_leaves_nginx_rotation_and_comes_back(
    tmp_path: Path, child: subprocess.Popen[bytes], worker_socket: Path
) -> None:
    """Not killed: the requests it holds finish when it resumes (Nginx could not
    re-send their bodies); new connections find no socket and Nginx moves them to the
    other workers meanwhile. No Nginx reload, so no client keep-alive is closed."""
    sock = worker_socket / "relay-1.sock"
    watchdog = _watchdog(
        tmp_path, relay_workers=2, relay_worker_socket_dir=worker_socket, stall_kill_after=30.0
    )
    try:
        assert await _answers(sock) == "worker 1"
        heartbeat(tmp_path / "hb", 0, os.getpid(), age=0.0)
        heartbeat(tmp_path / "hb", 1, child.pid, age=2.0)
        found = await watchdog.check()
        assert [s.pid for s in found] == [child.pid]
        assert child.poll() is None, "not killed"
        # A connect now fails at once, as Nginx's does: it moves to the next worker.
        with pytest.raises(FileNotFoundError):
            await _answers(sock)
        await watchdog.check()
        assert watchdog.stalls._value.get() == 1, "one stall, counted once"
        heartbeat(tmp_path / "hb", 1, child.pid, age=0.0)  # it beats again
        assert await watchdog.check() == []
        # The same listening socket is reachable again under its name.
        assert await _answers(sock) == "worker 1"
        assert sorted(os.listdir(worker_socket)) == ["relay-1.sock"]
        seen = [e.event for e in watchdog.events.recent]
        assert seen == ["RELAY_WORKER_STALLED", "RELAY_WORKER_RECOVERED"]
        assert f"relay worker 1 (pid {child.pid})" in watchdog.events.recent[0].detail
    finally:
        watchdog.events.close()
    log = (tmp_path / "ha.log").read_text()
    assert "RELAY_WORKER_STALLED relay worker 1" in log and "out of Nginx's rotation" in log


async def test_a_worker_frozen_for_good_is_killed_in_the_end(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    os.kill(child.pid, signal.SIGSTOP)  # frozen, as `kill -STOP` leaves it
    sockets = tmp_path / "sock"
    sockets.mkdir()
    (sockets / "relay-1.sock").write_text("stands in for the frozen worker's socket")
    watchdog = _watchdog(
        tmp_path, relay_workers=2, relay_worker_socket_dir=sockets, stall_kill_after=1.0
    )
    try:
        heartbeat(tmp_path / "hb", 1, child.pid, age=2.0)  # out of rotation 2 s ago
        await watchdog.check()
        assert child.poll() is None
        heartbeat(tmp_path / "hb", 1, child.pid, age=3.5)
        await watchdog.check()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert "killed, supervisord restarts it" in watchdog.events.recent[-1].detail
        # supervisord's new worker binds a fresh socket and beats: the old file goes.
        (sockets / "relay-1.sock").write_text("the new worker's socket")
        heartbeat(tmp_path / "hb", 1, os.getpid(), age=0.0)
        await watchdog.check()
        assert os.listdir(sockets) == ["relay-1.sock"]
        assert (sockets / "relay-1.sock").read_text() == "the new worker's socket"
        assert watchdog.events.recent[-1].event == "RELAY_WORKER_RECOVERED"
    finally:
        watchdog.events.close()


async def test_with_one_shared_port_a_frozen_worker_is_killed_at_once(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    watchdog = _watchdog(tmp_path)
    try:
        heartbeat(tmp_path / "hb", 0, child.pid, age=2.0)
        found = await watchdog.check()
        assert [s.pid for s in found] == [child.pid]
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert "killed" in watchdog.events.recent[0].detail
        assert await watchdog.check() == [], "a dead worker is not killed twice"
    finally:
        watchdog.events.close()


def test_the_next_look_is_when_the_stalest_heartbeat_could_first_be_stale(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    watchdog = _watchdog(tmp_path)  # limit 0.8 s: a tenth is 0.08 s
    try:
        assert watchdog.next_look() == pytest.approx(0.8), "no worker yet: the limit"
        heartbeat(tmp_path / "hb", 0, os.getpid(), age=0.1)
        heartbeat(tmp_path / "hb", 1, child.pid, age=0.3)
        assert watchdog.next_look() == pytest.approx(0.5, abs=0.05)
        heartbeat(tmp_path / "hb", 1, child.pid, age=0.79)  # about to be stale
        assert watchdog.next_look() == pytest.approx(0.08), "never sooner than a tenth"
        heartbeat(tmp_path / "hb", 1, 999_999_999, age=5.0)  # a dead worker's file
        assert watchdog.next_look() == pytest.approx(0.08), "no spinning on it"
        watchdog.down["1"] = object()  # type: ignore[assignment]
        heartbeat(tmp_path / "hb", 1, child.pid, age=0.0)
        assert watchdog.next_look() == pytest.approx(0.08), "a frozen one is watched closely"
    finally:
        watchdog.events.close()


async def test_a_worker_that_stops_beating_is_found_at_the_limit_with_few_looks(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    """The watchdog as it runs: while every worker beats it looks about once per
    limit (a look every tenth of it cost as much CPU as a relay worker), and still
    finds a worker stale within a tenth of the limit of its last beat."""
    sockets = tmp_path / "sock"
    sockets.mkdir()
    (sockets / "relay-1.sock").write_text("stands in for worker 1's socket")
    watchdog = _watchdog(
        tmp_path,
        relay_workers=2,
        relay_worker_socket_dir=sockets,
        access_log=tmp_path / "access.log",
    )
    looks = 0
    check = watchdog.check

    async def counted(late: float = 0.0) -> list[object]:
        nonlocal looks
        looks += 1
        return await check(late)  # type: ignore[return-value]

    watchdog.check = counted  # type: ignore[assignment,method-assign]
    stop = asyncio.Event()
    beating = asyncio.ensure_future(beat(tmp_path / "hb", 0, 0.05, stop))
    try:
        heartbeat(tmp_path / "hb", 1, child.pid, age=0.0)
        await watchdog.start()
        started = time.monotonic()
        while time.monotonic() - started < 1.6:  # worker 1 beats for two limits
            heartbeat(tmp_path / "hb", 1, child.pid, age=0.0)
            last_beat = (tmp_path / "hb" / "1").stat().st_mtime
            await asyncio.sleep(0.05)
        assert looks <= 5, f"{looks} looks in 1.6 s while every worker beat"
        assert not watchdog.events.recent
        deadline = time.monotonic() + 5
        while not watchdog.events.recent:
            assert time.monotonic() < deadline, "worker 1 never found stale"
            await asyncio.sleep(0.01)
        found_after = time.time() - last_beat
        assert watchdog.events.recent[0].event == "RELAY_WORKER_STALLED"
        assert "relay worker 1" in watchdog.events.recent[0].detail
        # limit (0.8) + a tenth of it, and room for this shared machine's scheduling.
        assert 0.8 <= found_after <= 0.8 + 0.08 + 0.25, found_after
    finally:
        stop.set()
        await asyncio.wait_for(beating, 1.0)
        await watchdog.stop()


def test_the_watchdog_needs_the_heartbeat_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HA_HEARTBEAT_DIR"):
        WatchdogService(
            RelaySettings(ha_log=str(tmp_path / "ha.log")), store=FakeStore(FakeClock())
        )


def test_nginx_lists_a_socket_per_relay_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At start: every worker's own socket, or the shared port without them."""
    from ha_agent.gateway.edge.nginx_conf import relay_servers
    from ha_agent.gateway.edge.nginx_sync import render_relay_servers

    env = {"HA_RELAY_WORKERS": "3", "HA_RELAY_WORKER_SOCKET_DIR": "/run/x"}
    assert relay_servers(env) == [f"unix:/run/x/relay-{i}.sock" for i in range(3)]
    assert relay_servers({"HA_RELAY_PORT": "8001"}) == ["127.0.0.1:8001"]
    text = render_relay_servers(["unix:/run/x/relay-0.sock", "unix:/run/x/relay-1.sock"])
    assert text.splitlines()[1:] == [
        "server unix:/run/x/relay-0.sock max_fails=1 fail_timeout=2s;",
        "server unix:/run/x/relay-1.sock max_fails=1 fail_timeout=2s;",
    ]


class FakeSchedstat:
    """/proc/<pid>/schedstat as a test makes it grow; None for a pid it was never given
    (as for a file that cannot be read)."""

    def __init__(self) -> None:
        self.stats: dict[int, SchedStat] = {}

    def __call__(self, pid: int) -> SchedStat | None:
        return self.stats.get(pid)

    def grow(self, pid: int, run: float = 0.0, wait: float = 0.0) -> None:
        was = self.stats.get(pid, SchedStat(0.0, 0.0))
        self.stats[pid] = SchedStat(was.run + run, was.wait + wait)


def _rotating(
    tmp_path: Path,
    clock: Callable[[], float],
    schedstat: Callable[[int], SchedStat | None],
    **extra: object,
) -> tuple[WatchdogService, Path]:
    """A watchdog over two workers with a socket each; worker 1's socket file."""
    sockets = tmp_path / "sock"
    sockets.mkdir()
    (sockets / "relay-1.sock").write_text("stands in for worker 1's socket")
    watchdog = _watchdog(
        tmp_path,
        clock=clock,
        schedstat=schedstat,
        relay_workers=2,
        relay_worker_socket_dir=sockets,
        **extra,
    )
    return watchdog, sockets / "relay-1.sock"


async def _goes_quiet(
    watchdog: WatchdogService,
    clock: FakeClock,
    schedstat: FakeSchedstat,
    pid: int,
    run: float,
    wait: float,
) -> list[object]:
    """Worker 1 beats, a look samples it, it beats once more and then not for 1 s, over
    which its loop thread gains `run` s on a CPU and `wait` s waiting for one; the look
    that follows."""
    schedstat.grow(pid, run=5.0, wait=1.0)  # its times so far
    heartbeat(watchdog.dir, 1, pid, 0.0, clock)
    assert await watchdog.check() == []
    clock.advance(0.05)
    heartbeat(watchdog.dir, 1, pid, 0.0, clock)  # its last beat, after that look
    clock.advance(1.0)
    schedstat.grow(pid, run=run, wait=wait)
    return await watchdog.check()  # type: ignore[return-value]


async def test_a_worker_starved_of_cpu_stays_in_the_rotation(
    tmp_path: Path, child: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Its loop was runnable but got no CPU: it beats as soon as it gets one, and taking
    it out would send its share to the other workers (or past admission to the nodes)."""
    clock, schedstat = FakeClock(), FakeSchedstat()
    watchdog, sock = _rotating(tmp_path, clock, schedstat)
    caplog.set_level(logging.INFO, logger="ha_agent.gateway.edge.watchdog")
    try:
        assert await _goes_quiet(watchdog, clock, schedstat, child.pid, run=0.02, wait=0.9) == []
        assert sock.exists(), "still in Nginx's rotation"
        assert watchdog.starvations._value.get() == 1
        assert watchdog.next_look() == pytest.approx(0.08), "watched closely meanwhile"
        clock.advance(0.08)
        schedstat.grow(child.pid, wait=0.08)
        assert await watchdog.check() == [], "still starved"
        heartbeat(watchdog.dir, 1, child.pid, 0.0, clock)  # it got a CPU
        clock.advance(0.01)
        schedstat.grow(child.pid, run=0.01)
        assert await watchdog.check() == []
        assert sock.exists()
        assert watchdog.stalls._value.get() == 0
        assert watchdog.starvations._value.get() == 1, "one episode, counted once"
        assert not watchdog.events.recent, "no RELAY_WORKER_STALLED"
    finally:
        watchdog.events.close()
    said = [r for r in caplog.records if "starved" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.INFO], "logged once"
    assert f"relay worker 1 (pid {child.pid}): no heartbeat for 1.0s" in said[0].getMessage()


@pytest.mark.parametrize(
    ("run", "wait"),
    [(0.0, 0.0), (0.95, 0.03), (0.55, 0.4)],
    ids=["stopped", "spinning", "spinning-on-a-busy-cpu"],
)
async def test_a_worker_that_did_not_wait_for_a_cpu_is_frozen(
    tmp_path: Path, child: subprocess.Popen[bytes], run: float, wait: float
) -> None:
    """A stopped or blocked loop gains neither time; a spinning one gains run time and
    waits for less than half of its silence."""
    clock, schedstat = FakeClock(), FakeSchedstat()
    watchdog, sock = _rotating(tmp_path, clock, schedstat)
    try:
        found = await _goes_quiet(watchdog, clock, schedstat, child.pid, run=run, wait=wait)
        assert [s.pid for s in found] == [child.pid]  # type: ignore[attr-defined]
        assert not sock.exists(), "out of Nginx's rotation"
        assert watchdog.stalls._value.get() == 1
        assert watchdog.starvations._value.get() == 0
        assert [e.event for e in watchdog.events.recent] == ["RELAY_WORKER_STALLED"]
    finally:
        watchdog.events.close()


async def test_starvation_excuses_a_stale_heartbeat_only_for_a_while(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    clock, schedstat = FakeClock(), FakeSchedstat()
    watchdog, sock = _rotating(tmp_path, clock, schedstat)  # unset: 3 x 0.8 s
    assert watchdog.starved_limit == pytest.approx(2.4)
    try:
        assert await _goes_quiet(watchdog, clock, schedstat, child.pid, run=0.0, wait=1.0) == []
        for _ in range(2):  # silent 1.55 s, then 2.05 s: still waiting for a CPU, still in
            clock.advance(0.5)
            schedstat.grow(child.pid, wait=0.5)
            assert await watchdog.check() == []
            assert sock.exists()
        clock.advance(0.5)
        schedstat.grow(child.pid, wait=0.5)
        found = await watchdog.check()  # silent 2.55 s: past the bound, frozen
        assert [s.pid for s in found] == [child.pid]
        assert not sock.exists()
        assert watchdog.stalls._value.get() == 1
        assert "no heartbeat for 2.5s; out of Nginx's rotation" in watchdog.events.recent[0].detail
        assert not watchdog.starved
    finally:
        watchdog.events.close()


def test_the_starvation_bound_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HA_STALL_STARVED_LIMIT", "1.5")
    watchdog = _watchdog(tmp_path)
    try:
        assert watchdog.starved_limit == 1.5
    finally:
        watchdog.events.close()


async def test_a_worker_whose_schedstat_cannot_be_read_is_judged_by_its_heartbeat(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    clock = FakeClock()
    watchdog, sock = _rotating(tmp_path, clock, FakeSchedstat())  # knows no pid
    try:
        heartbeat(watchdog.dir, 1, child.pid, 0.0, clock)
        assert await watchdog.check() == []
        clock.advance(0.9)
        assert [s.pid for s in await watchdog.check()] == [child.pid]
        assert not sock.exists()
    finally:
        watchdog.events.close()


def test_schedstat_is_read_from_proc(child: subprocess.Popen[bytes]) -> None:
    mine = read_schedstat(os.getpid())
    assert mine is not None and mine.run > 0, "this process has run"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    assert read_schedstat(dead.pid) is None


async def test_a_look_that_runs_late_does_not_count_its_lateness(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    """The whole VM paused a second (hypervisor steal): the watchdog wakes a second after
    it meant to and every heartbeat is a second older, though no worker froze."""
    clock = FakeClock()
    watchdog, sock = _rotating(tmp_path, clock, FakeSchedstat())
    try:
        heartbeat(watchdog.dir, 0, os.getpid(), 1.05, clock)
        heartbeat(watchdog.dir, 1, child.pid, 1.05, clock)
        assert await watchdog.check(late=1.0) == []
        assert sock.exists()
        # Meant to look then, the heartbeats were as old: both frozen.
        assert len(await watchdog.check(late=0.0)) == 2
    finally:
        watchdog.events.close()


async def test_the_watchdog_measures_how_late_it_woke(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    """As it runs: the clock jumps a second while the watchdog sleeps (the VM paused,
    its workers with it), and the look that follows finds no worker frozen."""
    shift = 0.0

    def clock() -> float:
        return time.time() + shift

    watchdog, sock = _rotating(tmp_path, clock, FakeSchedstat())
    pids = {0: os.getpid(), 1: child.pid}
    paused = False
    due = float("inf")  # time.monotonic() of the watchdog's next planned look
    late_looks: list[tuple[float, float | None]] = []
    next_look, check = watchdog.next_look, watchdog.check

    def planned(beats: list[Heartbeat] | None = None) -> float:
        nonlocal due
        delay = next_look(beats)
        due = time.monotonic() + delay
        return delay

    async def looked(late: float = 0.0) -> list[object]:
        nonlocal paused
        if paused:
            ages = [clock() - b.beat_at for b in read_heartbeats(watchdog.dir)]
            late_looks.append((late, max(ages, default=None)))
        found = await check(late)
        paused = False  # the VM runs again, and so do the workers
        return found  # type: ignore[return-value]

    watchdog.next_look = planned  # type: ignore[method-assign]
    watchdog.check = looked  # type: ignore[assignment,method-assign]
    for index, pid in pids.items():
        heartbeat(watchdog.dir, index, pid, 0.0, clock)
    await watchdog.start()
    try:
        deadline = time.monotonic() + 10
        while not late_looks:
            assert time.monotonic() < deadline, "never paused just before a look"
            if not paused:
                for index, pid in pids.items():
                    heartbeat(watchdog.dir, index, pid, 0.0, clock)
                if 0.02 < due - time.monotonic() < 0.06:
                    paused, shift = True, shift + 1.0
            await asyncio.sleep(0.005)
        late, age = late_looks[0]
        assert late >= 1.0 and age is not None and age > 1.0, late_looks
        for _ in range(40):  # 0.2 s of beats more, looks included
            for index, pid in pids.items():
                heartbeat(watchdog.dir, index, pid, 0.0, clock)
            await asyncio.sleep(0.005)
        assert sock.exists()
        assert not watchdog.events.recent, "no worker taken out"
    finally:
        await watchdog.stop()


async def test_with_one_shared_port_a_starved_worker_is_not_killed(
    tmp_path: Path, child: subprocess.Popen[bytes]
) -> None:
    clock, schedstat = FakeClock(), FakeSchedstat()
    watchdog = _watchdog(tmp_path, clock=clock, schedstat=schedstat)
    try:
        assert await _goes_quiet(watchdog, clock, schedstat, child.pid, run=0.0, wait=0.8) == []
        assert child.poll() is None, "not killed"
        assert watchdog.starvations._value.get() == 1
    finally:
        watchdog.events.close()
