"""Which run's output decides "OOM": the run that died, even when supervisord has
already started the next one by the time the agent reads the log."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from ha_agent.node.engine import process
from ha_agent.node.engine.process import (
    EXCEPTION_TEXT,
    OOM_TEXT,
    OUTPUT_SETTLE,
    START_MARKER,
    HostProcessWatch,
    SupervisorWatch,
    output_of_run,
)
from ha_agent.sim.faults import CRASH_LINES, OOM_LINE


def marker(pid: int) -> str:
    return f"{START_MARKER} ENGINE=simulator (pid {pid})\n"


def oom_in(log: str, pid: int) -> bool:
    return bool(OOM_TEXT.search(output_of_run(log, pid)))


def test_the_dead_run_is_read_even_after_the_next_run_started() -> None:
    log = marker(11) + "loading\ntorch.OutOfMemoryError: CUDA out of memory\n" + marker(122)
    assert oom_in(log, 11)
    assert not oom_in(log, 122)


def test_an_earlier_run_oom_does_not_taint_a_later_crash() -> None:
    log = marker(11) + "CUDA out of memory\n" + marker(122) + "Segmentation fault\n" + marker(130)
    assert not oom_in(log, 122)


def test_the_dead_runs_marker_scrolled_out_of_the_tail() -> None:
    log = "...serving\nCUDA out of memory. Tried to allocate\n" + marker(122) + "starting\n"
    assert oom_in(log, 11)


def test_without_a_known_pid_the_last_run_counts() -> None:
    log = marker(11) + "CUDA out of memory\n" + marker(122) + "exit\n"
    assert not oom_in(log, 0)
    assert oom_in(marker(11) + "CUDA out of memory\n", 0)


def test_the_latest_run_with_the_pid_counts_when_an_older_container_reused_it() -> None:
    """The log is a volume: a container started before this one also had pid 11."""
    old_container = marker(11) + "served for an hour\n" + marker(57) + "restarted\n"
    log = old_container + marker(11) + "torch.OutOfMemoryError: CUDA out of memory\n"
    assert oom_in(log, 11)
    assert oom_in(log + marker(180), 11)


class _FakeSupervisor:
    """supervisord's XML-RPC as SupervisorWatch reads it: a process state, its stderr
    log and supervisord's own log."""

    def __init__(self) -> None:
        self.info = {"statename": "RUNNING", "pid": 10}
        self.stderr = marker(10) + "loading\n"
        self.log = ""

    def getProcessInfo(self, program: str) -> dict[str, object]:
        return self.info

    def tailProcessStderrLog(self, program: str, offset: int, length: int) -> list[object]:
        return [self.stderr, 0, False]

    def readLog(self, offset: int, length: int) -> str:
        return self.log


def test_an_oom_line_logged_after_the_death_is_still_seen() -> None:
    """supervisord may report the death before it drained the run's last output."""
    watch = SupervisorWatch("/nonexistent.sock", "engine")
    fake = _FakeSupervisor()
    watch._rpc = type("Rpc", (), {"supervisor": fake})()
    assert watch._read().running
    fake.info = {"statename": "EXITED", "pid": 0}
    fake.log = "INFO exited: engine (terminated by SIGKILL; not expected)\n"
    first = watch._read()
    assert not first.running and not first.oom and "SIGKILL" in first.exit_how
    fake.stderr += "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n"
    fake.info = {"statename": "STARTING", "pid": 0}
    assert watch._read().oom, "the late line counts for the run that died"
    fake.info = {"statename": "RUNNING", "pid": 11}
    fake.stderr += marker(11)
    assert not watch._read().oom, "the next run starts clean"


def test_the_engines_own_exception_is_told_from_a_kill_and_an_oom() -> None:
    """SGLang's scheduler logs "Scheduler hit an exception" before it takes the server
    down (srt/managers/scheduler.py); a kill or an OOM kill never print it."""
    assert EXCEPTION_TEXT.search(CRASH_LINES)
    assert EXCEPTION_TEXT.search("[2026-12-06] DetokenizerManager hit an exception: Traceback")
    assert not EXCEPTION_TEXT.search(OOM_LINE)
    assert not EXCEPTION_TEXT.search("Received sigquit from a child process.")
    watch = SupervisorWatch("/nonexistent.sock", "engine")
    fake = _FakeSupervisor()
    watch._rpc = type("Rpc", (), {"supervisor": fake})()
    assert watch._read().running
    fake.info = {"statename": "EXITED", "pid": 0}
    fake.log = "INFO exited: engine (terminated by SIGKILL; not expected)\n"
    assert not watch._read().exception, "a kill"
    fake.stderr += CRASH_LINES + "\n"  # drained into the log after the death was seen
    gone = watch._read()
    assert gone.exception and not gone.oom and "own exception" in gone.describe()
    fake.info = {"statename": "RUNNING", "pid": 11}
    fake.stderr += marker(11)
    assert not watch._read().exception, "the next run starts clean"
    fake.info = {"statename": "EXITED", "pid": 0}
    fake.stderr += OOM_LINE + "\n"
    gone = watch._read()
    assert gone.oom and not gone.exception


def test_a_sidecar_engine_restarted_between_two_looks_still_tells_how_it_died(
    tmp_path: Path,
) -> None:
    """An engine restarted at once (a user's own supervisor) is never seen gone: the
    new run's appearance reports the old one's death, once, with what its log said."""
    proc, log = tmp_path / "proc", tmp_path / "engine.log"
    proc.mkdir()
    log.write_text("starting\n")

    def run(pid: int, start: int) -> None:
        (proc / str(pid)).mkdir()
        rest = " ".join(["0"] * 17)
        (proc / str(pid) / "stat").write_text(f"{pid} (python) S 1 {rest} {start} 0 0\n")
        (proc / str(pid) / "cmdline").write_bytes(
            b"python\x00-m\x00ha_agent.sim\x00--port\x00030\x00"
        )

    def gone(pid: int) -> None:
        for f in (proc / str(pid)).iterdir():
            f.unlink()
        (proc / str(pid)).rmdir()

    watch = HostProcessWatch(pattern="ha_agent.sim --port 030", log_file=str(log), proc=str(proc))
    run(100, 5)
    assert watch._read().running
    with log.open("a") as fh:
        fh.write(CRASH_LINES + "\n")
    gone(100)
    run(101, 9)
    died = watch._read()
    assert not died.running and died.exception and not died.oom
    assert watch._read().running and watch._read().pid == 101
    gone(101)  # kill -9, seen this time
    killed = watch._read()
    assert killed.state == "EXITED" and not killed.exception


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_dead_runs_output_is_final_only_once_it_had_time_to_reach_the_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`final` (no exception still to come) is said only a settle time after the
    death was first read, whatever the engine is doing by then (restarting)."""
    clock = _Clock()
    monkeypatch.setattr(process, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    watch = SupervisorWatch("/nonexistent.sock", "engine")
    fake = _FakeSupervisor()
    watch._rpc = type("Rpc", (), {"supervisor": fake})()
    assert not watch._read().final, "running: nothing to say"
    fake.info = {"statename": "EXITED", "pid": 0}
    fake.log = "INFO exited: engine (terminated by SIGKILL; not expected)\n"
    first = watch._read()
    assert not first.final and not first.exception, "just seen: a line may still come"
    clock.now += OUTPUT_SETTLE / 2
    fake.info = {"statename": "STARTING", "pid": 0}
    assert not watch._read().final
    clock.now += OUTPUT_SETTLE / 2
    settled = watch._read()
    assert settled.final and not settled.exception, "a kill, for good"
    fake.info = {"statename": "RUNNING", "pid": 11}
    fake.stderr += marker(11)
    assert not watch._read().final, "the next run"
    fake.info = {"statename": "EXITED", "pid": 0}
    fake.stderr += CRASH_LINES + "\n"
    clock.now += 5  # long after the previous death: this one is new
    crashed = watch._read()
    assert crashed.exception and not crashed.final
    clock.now += OUTPUT_SETTLE
    assert watch._read().final and watch._read().exception


def test_a_sidecar_reads_a_gone_engines_log_again_before_it_is_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar's engine log may get its last line after the process is gone (written
    through a pipe): read once more a settle time later, and only then final."""
    clock = _Clock()
    monkeypatch.setattr(process, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    proc, log = tmp_path / "proc", tmp_path / "engine.log"
    (proc / "100").mkdir(parents=True)
    rest = " ".join(["0"] * 17)
    (proc / "100" / "stat").write_text(f"100 (python) S 1 {rest} 5 0 0\n")
    (proc / "100" / "cmdline").write_bytes(b"python\x00-m\x00ha_agent.sim\x00")
    log.write_text("starting\n")
    watch = HostProcessWatch(pattern="ha_agent.sim", log_file=str(log), proc=str(proc))
    assert watch._read().running
    for f in (proc / "100").iterdir():
        f.unlink()
    (proc / "100").rmdir()
    gone = watch._read()
    assert gone.state == "EXITED" and not gone.exception and not gone.final
    with log.open("a") as fh:
        fh.write(CRASH_LINES + "\n")  # late
    clock.now += OUTPUT_SETTLE
    settled = watch._read()
    assert settled.final and settled.exception, "the late line counts"
