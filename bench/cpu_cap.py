"""A CPU cap for the processes under test: a cgroup with a CFS quota (v2 or v1).

The relay-scaling bar asks whether a second relay worker doubles what one sustains at
saturation, with cores to spare. On a 2-core host one uncapped worker already drives
the host to saturation (the engine and the client share its cores), so the host is
measured, not the relay. Each worker capped at a fraction of a core saturates at its
cap with the host's cores still partly idle: then 2 ÷ 1 measures what a second worker
adds, as it would on a host with a free core per worker. The report states the cap
and the host's busy cores beside every row.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000  # a short period: a capped worker waits at most 10 ms for its quota


class CapUnavailable(RuntimeError):
    """No writable cgroup CPU controller here (not root, or no cpu controller)."""


class CpuCap:
    """One cgroup per capped process group; `add` a pid, `remove` once they have exited."""

    def __init__(self, name: str, cores: float) -> None:
        if cores <= 0:
            raise ValueError("a CPU cap needs a positive number of cores")
        self.cores = cores
        quota = max(1000, int(cores * PERIOD_US))
        if (ROOT / "cgroup.controllers").exists():  # cgroup v2: one unified tree
            if "cpu" not in (ROOT / "cgroup.controllers").read_text().split():
                raise CapUnavailable("the cgroup v2 root has no cpu controller")
            self.path = ROOT / name
            with contextlib.suppress(OSError):  # already on, or set by the host
                (ROOT / "cgroup.subtree_control").write_text("+cpu")
            self._make()
            self._write("cpu.max", f"{quota} {PERIOD_US}")
        elif (ROOT / "cpu" / "cpu.cfs_quota_us").exists():  # cgroup v1
            self.path = ROOT / "cpu" / name
            self._make()
            self._write("cpu.cfs_period_us", str(PERIOD_US))
            self._write("cpu.cfs_quota_us", str(quota))
        else:
            raise CapUnavailable("no cgroup CPU controller under /sys/fs/cgroup")

    def _make(self) -> None:
        try:
            self.path.mkdir(exist_ok=True)
        except OSError as exc:
            raise CapUnavailable(f"cannot create {self.path}: {exc}") from exc

    def _write(self, name: str, value: str) -> None:
        try:
            (self.path / name).write_text(value)
        except OSError as exc:
            self.remove()
            raise CapUnavailable(f"cannot write {self.path / name}: {exc}") from exc

    def add(self, pid: int) -> None:
        """The process and the threads it starts from now on run under the cap."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CapUnavailable(f"cannot move pid {pid} into {self.path}: {exc}") from exc

    def remove(self) -> None:
        """The cgroup goes once its processes have exited (rmdir refuses before)."""
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
