"""The access log rotation's own rules (the real Nginx: test_hardening_nginx.py)."""

from __future__ import annotations

import signal
from pathlib import Path

from ha_agent.gateway.edge.access_log import AccessLogRotator


def _rotator(tmp_path: Path, sent: list[tuple[int, int]]) -> AccessLogRotator:
    return AccessLogRotator(
        tmp_path / "access.log",
        4096,
        keep=3,
        pid_file=tmp_path / "nginx.pid",
        signal_process=lambda pid, sig: sent.append((pid, sig)),
    )


def test_nothing_is_renamed_while_no_nginx_could_reopen_it(tmp_path: Path) -> None:
    sent: list[tuple[int, int]] = []
    rotator = _rotator(tmp_path, sent)
    assert not rotator.check()  # no log yet
    (tmp_path / "access.log").write_bytes(b"x" * 5000)
    assert not rotator.check()  # no pid file: Nginx is not up
    assert (tmp_path / "access.log").stat().st_size == 5000 and not sent


def test_files_shift_up_to_keep_and_nginx_is_told_to_reopen(tmp_path: Path) -> None:
    sent: list[tuple[int, int]] = []
    rotator = _rotator(tmp_path, sent)
    (tmp_path / "nginx.pid").write_text("4242\n")
    for n in range(5):
        (tmp_path / "access.log").write_bytes(str(n).encode() * 5000)
        assert rotator.check()
    assert sent == [(4242, signal.SIGUSR1)] * 5
    kept = {p.name: p.read_bytes()[:1] for p in tmp_path.glob("access.log*")}
    assert kept == {"access.log.1": b"4", "access.log.2": b"3", "access.log.3": b"2"}
