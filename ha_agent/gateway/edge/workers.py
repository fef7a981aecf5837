"""How many relay workers, and what only one of them does.

The relay runs as N independent processes (supervisord's `numprocs`, see
images/gateway/supervisord.conf), all bound to the same data and admin ports with
SO_REUSEPORT: the kernel spreads Nginx's connections over them, and a request's
whole life (its retries, its stream's migrations) stays in the worker that
accepted it, so no state is shared and no affinity is needed. Each worker keeps
its own topology view (its own poll of the store and the agents).

What must happen once per gateway, not once per worker, is worker 0's: the
topology's HA events (LEADER_CHANGED, NODE_UNREACHABLE, ...) and Nginx's backup
list. Metrics are summed over the workers with prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR, set by the image's entrypoint).

`python -m ha_agent.gateway.edge.workers` prints the number to run: HA_RELAY_WORKERS
if set and not 0, else the CPUs this container may use. Nginx runs half as many
workers, rounded up (`nginx_worker_count`, HA_NGINX_WORKERS to override).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this cgroup in cores (v2 cpu.max or v1 cfs quota), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def usable_cpus(root: Path = CGROUP) -> int:
    """The cores this process may run on: its affinity, capped by the cgroup quota."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def _configured(name: str) -> int:
    """A count from the environment; 0 when unset, empty or not a number."""
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


def worker_count(configured: int | None = None) -> int:
    """HA_RELAY_WORKERS when set to a positive number, else usable_cpus()."""
    if configured is None:
        configured = _configured("HA_RELAY_WORKERS")
    return configured if configured > 0 else usable_cpus()


def nginx_worker_count(relay_workers: int | None = None) -> int:
    """HA_NGINX_WORKERS when set to a positive number, else one per two relay workers
    (rounded up).

    Half: Nginx spends under half of the gateway's CPU per streamed event (Nginx alone
    22-33 µs, TLS included, against the gateway's 55-86 µs: docs/benchmarks.md,
    capacity and edge TLS), so half as many Nginx workers as relay workers can use all
    the cores Nginx's share needs. Each Nginx worker is another process woken on the
    event path: in six capacity runs on 2 cores, the two-relay-worker gateway was on
    average 0.6 µs per event over its bar with one Nginx worker and 6.5 µs with two
    (docs/benchmarks.md, "Nginx's workers, six runs").

    Not Nginx's `worker_processes auto`: that counts the host's online CPUs, neither
    the container's cpuset nor its CPU quota (Nginx 1.22,
    bench/results/nginx-workers-runs), so a gateway limited to 2 cores on a 64-core
    host would start 64 workers.
    """
    configured = _configured("HA_NGINX_WORKERS")
    if configured > 0:
        return configured
    relay = relay_workers if relay_workers is not None else worker_count()
    return max(1, math.ceil(relay / 2))


def share(total: float, workers: int) -> float:
    """One worker's part of a gateway-wide rate (the standby warming's mirrors)."""
    return total / max(workers, 1)


if __name__ == "__main__":
    print(worker_count())
    sys.exit(0)
