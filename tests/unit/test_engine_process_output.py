"""Which run's output decides "OOM": the run that died, even when supervisord has
already started the next one by the time the agent reads the log."""

from __future__ import annotations

from ha_agent.node.engine.process import OOM_TEXT, START_MARKER, output_of_run


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
