"""Several relay workers (ha_agent/gateway/edge/workers.py): how many, which one speaks
for the gateway, and metrics that add up over all of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ha_agent.gateway.edge.workers import (
    cgroup_cpu_limit,
    nginx_worker_count,
    usable_cpus,
    worker_count,
)
from tests.support.nginx_render import render_into


def test_the_cgroup_quota_caps_the_workers(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 0.5
    assert usable_cpus(tmp_path) == 1  # never none
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_an_explicit_count_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_count(3) == 3
    monkeypatch.setenv("HA_RELAY_WORKERS", "0")
    assert worker_count() == usable_cpus()
    monkeypatch.setenv("HA_RELAY_WORKERS", "5")
    assert worker_count() == 5


# Two processes, as two workers: each counts requests; either one's /metrics
# exposition reports the sum, and the in-flight gauge of a dead worker is dropped.
_WORKER = """
import os, sys
from prometheus_client import generate_latest
from ha_agent.gateway.metrics import RelayMetrics
m = RelayMetrics()
m.requests.labels("chat", "sglang-01", "ok", "200").inc(int(sys.argv[1]))
m.inflight.inc(int(sys.argv[2]))
sys.stdout.write(generate_latest(m.exposed).decode())
"""


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in\n{text}")


def test_nginx_runs_half_as_many_workers_as_the_relay_unless_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HA_NGINX_WORKERS", raising=False)
    monkeypatch.setenv("HA_RELAY_WORKERS", "3")
    assert nginx_worker_count() == 2
    assert [nginx_worker_count(relay_workers=n) for n in (1, 2, 4, 5, 8)] == [1, 1, 2, 3, 4]
    monkeypatch.setenv("HA_NGINX_WORKERS", "0")
    assert nginx_worker_count() == 2
    monkeypatch.setenv("HA_NGINX_WORKERS", "5")
    assert nginx_worker_count() == 5


def test_the_rendered_nginx_config_counts_the_containers_cpus_not_the_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nginx's `auto` would count the host's CPUs; the gateway's Nginx gets half the
    relay's worker count, which the cpuset and the quota cap (the entrypoint resolves it
    first)."""
    from ha_agent.gateway.edge import nginx_conf

    conf = render_into(monkeypatch, tmp_path, HA_RELAY_WORKERS="4")
    monkeypatch.delenv("HA_NGINX_WORKERS", raising=False)
    assert nginx_conf.main() == 0
    assert "\nworker_processes 2;\n" in conf.read_text()
    monkeypatch.setenv("HA_NGINX_WORKERS", "3")
    assert nginx_conf.main() == 0
    assert "\nworker_processes 3;\n" in conf.read_text()


def test_metrics_add_up_over_the_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = [sys.executable, "-c", _WORKER]
    first = subprocess.run([*run, "3", "2"], env=env, capture_output=True, text=True, check=True)
    assert _sample(first.stdout, "sglang_ha_relay_requests_total") == 3
    second = subprocess.run([*run, "4", "1"], env=env, capture_output=True, text=True, check=True)
    # The first worker is gone: its requests still count, its in-flight ones do not.
    assert _sample(second.stdout, "sglang_ha_relay_requests_total") == 7
    assert _sample(second.stdout, "sglang_ha_relay_inflight") == 1


async def test_only_worker_0_records_the_topologys_events(tmp_path: Path) -> None:
    from ha_agent.config import RelaySettings
    from ha_agent.gateway.service import RelayService
    from tests.support.fakes import FakeClock, FakeStore

    logs = []
    for index in (0, 1):
        settings = RelaySettings(
            relay_workers=2, relay_worker_index=index, ha_log=str(tmp_path / f"ha-{index}.log")
        )
        store = FakeStore(FakeClock())
        service = RelayService(settings, store)
        service.topology.events.emit("LEADER_CHANGED", "from - to sglang-01")
        # A stream's own events are the worker's that holds the stream.
        service.events.emit("STREAM_MIGRATED", "chat stream from sglang-01")
        service.events.close()
        logs.append(service.events.recent)
    assert [e.event for e in logs[0]] == ["LEADER_CHANGED", "STREAM_MIGRATED"]
    assert [e.event for e in logs[1]] == ["STREAM_MIGRATED"]
