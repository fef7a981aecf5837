"""CPU time per container, per process and for the whole host, read around each run.

Why: on a small shared machine the load generator, Nginx, the relay and the engines
all compete for the same cores. When a path adds latency, the CPU each part used
during that run tells whether the path itself is slow or the machine was full.
Read straight from the kernel (cgroup v1 cpuacct or v2 cpu.stat, /proc/stat), so
measuring costs nothing on the paths being measured.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def container_cpu_file(container_id: str) -> str | None:
    """The file that counts a container's CPU time, for cgroup v1 or v2 layouts."""
    for candidate in (
        CGROUP / "cpuacct" / "docker" / container_id / "cpuacct.usage",  # v1, cgroupfs
        CGROUP / "cpu,cpuacct" / "docker" / container_id / "cpuacct.usage",
        CGROUP / "cpuacct" / "system.slice" / f"docker-{container_id}.scope" / "cpuacct.usage",
        CGROUP / "system.slice" / f"docker-{container_id}.scope" / "cpu.stat",  # v2, systemd
        CGROUP / "docker" / container_id / "cpu.stat",  # v2, cgroupfs
    ):
        if candidate.exists():
            return str(candidate)
    return None


def read_cpu_seconds(path: str) -> float | None:
    """Cumulative CPU seconds from a cpuacct.usage (ns) or cpu.stat (usage_usec) file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None  # the container went away
    if path.endswith("cpu.stat"):
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        return None
    return int(text.strip()) / 1e9


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None once the
    process is reaped. The name is cut at its last ")": it may hold spaces and ")"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def processes_cpu_split(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes (/proc/PID/stat utime, stime); a
    process gone counts nothing."""
    user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None:
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
    return user, system


def processes_cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of these processes, user and system together."""
    return sum(processes_cpu_split(pids))


def processes_context_switches(pids: list[int]) -> tuple[int, int]:
    """Voluntary and involuntary context switches of these processes, all their threads
    (/proc/PID/status): a voluntary one is a sleep, so each is a wake-up after it; a
    process gone counts nothing."""
    voluntary = involuntary = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key == "voluntary_ctxt_switches":
                    voluntary += int(value)
                elif key == "nonvoluntary_ctxt_switches":
                    involuntary += int(value)
    return voluntary, involuntary


def host_busy_seconds() -> float:
    """CPU seconds the whole host spent not idle (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    busy = sum(ticks[:8]) - idle
    return busy / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Snapshot before a run, `cores()` after: average cores used by each part."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _read(self) -> dict[str, float]:
        out = {"host": host_busy_seconds(), "load generator": time.process_time()}
        for name, path in self.files.items():
            value = read_cpu_seconds(path)
            if value is not None:
                out[name] = value
        return out

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._start = self._read()

    def elapsed(self) -> float:
        """Seconds from start() to now."""
        return time.monotonic() - self._t0

    def cores(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        end = self._read()
        return {
            name: round((end[name] - self._start[name]) / elapsed, 3)
            for name in end
            if name in self._start
        }
