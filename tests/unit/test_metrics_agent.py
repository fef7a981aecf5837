"""The agent's /metrics: fed by the real HA cycle and the real engine monitor.

The HA state machine runs on a fake store and clock; the HealthMonitor is the real one
with a scripted engine client, so the latency histograms are fed by the same calls
that run in production. GPUs come from a stand-in for the NVML binding.
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ha_agent.config import AgentSettings
from ha_agent.events import EventLog
from ha_agent.node.engine.client import CanaryResult, EngineSample
from ha_agent.node.engine.monitor import HealthMonitor
from ha_agent.node.gpu import GpuCollector, load_nvml
from ha_agent.node.ha import Ha
from ha_agent.node.metrics import AgentMetrics
from tests.support.fakes import FakeClock, FakePeers, FakeStore

NODE = "sglang-01"
GiB = 1024**3


class ScriptedEngine:
    """EngineClient's interface: answers /metrics in `latency` s, canaries succeed."""

    def __init__(self, clock: FakeClock, latency: float = 0.02) -> None:
        self.clock = clock
        self.latency = latency
        self.canaries = 0

    async def scrape(self, timeout: float) -> EngineSample:
        return EngineSample(at=self.clock(), latency=self.latency)

    async def canary(self, timeout: float) -> CanaryResult:
        self.canaries += 1
        return CanaryResult(True, 0.3, "canary generated a token")

    async def forward_limits(self, timeout: float) -> None:
        return None  # /server_info says nothing: the monitor's default applies

    async def close(self) -> None:
        return None


class FakeNvml:
    """The few pynvml calls GpuCollector makes, for `memory` = [(used, total), ...]."""

    def __init__(self, memory: list[tuple[int, int]], broken: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.memory = memory
        self.broken = broken

    def nvmlInit(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        return len(self.memory)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index in self.broken:
            raise RuntimeError("GPU is lost")
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        used, total = self.memory[handle]
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=75, memory=40)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"


def settings() -> AgentSettings:
    return AgentSettings(
        node_name=NODE,
        advertise_engine_url="http://sglang-01:30000",
        advertise_api_url="http://sglang-01:8008",
        peers=["http://sglang-02:8008"],
        lease_ttl=2.5,
        loop_wait=0.5,
        retry_timeout=0.75,
        safety_margin=0.5,
        redis_url="redis://unused",
        supervisor_socket=None,
    )


def build(
    gpu: GpuCollector | None = None,
) -> tuple[Ha, HealthMonitor, ScriptedEngine, AgentMetrics, FakeClock]:
    clock = FakeClock()
    engine = ScriptedEngine(clock)
    s = settings()
    monitor = HealthMonitor(s, engine, None, clock=clock)  # type: ignore[arg-type]
    ha = Ha(s, FakeStore(clock), monitor, EventLog(None, NODE), FakePeers(), clock=clock)  # type: ignore[arg-type]
    metrics = AgentMetrics()
    metrics.attach(ha, gpu or GpuCollector(NODE, None))
    return ha, monitor, engine, metrics, clock


async def healthy(monitor: HealthMonitor) -> None:
    """Ticks until the first canary has confirmed the engine (bounded)."""
    for _ in range(50):
        await monitor.tick()
        await asyncio.sleep(0)
        if monitor.health.healthy:
            return
    raise AssertionError(f"engine never became healthy: {monitor.health}")


def value(metrics: AgentMetrics, metric: str, /, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(metric, labels)


def families(metrics: AgentMetrics) -> dict[str, Any]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_probe_latencies_are_observed_per_probe() -> None:
    _, monitor, engine, metrics, _ = build()
    # The series exist before any probe, at zero: rate() works from the first scrape.
    assert value(metrics, "sglang_ha_engine_probe_seconds_count", node=NODE, probe="metrics") == 0
    await healthy(monitor)
    scrapes = value(metrics, "sglang_ha_engine_probe_seconds_count", node=NODE, probe="metrics")
    assert scrapes is not None and scrapes >= 1
    total = value(metrics, "sglang_ha_engine_probe_seconds_sum", node=NODE, probe="metrics")
    assert total == pytest.approx(scrapes * engine.latency)
    assert engine.canaries >= 1
    assert value(metrics, "sglang_ha_engine_probe_seconds_count", node=NODE, probe="canary") == (
        engine.canaries
    )
    # 0.3 s lands in the (0.25, 0.5] bucket.
    assert (
        value(
            metrics, "sglang_ha_engine_probe_seconds_bucket", node=NODE, probe="canary", le="0.25"
        )
        == 0
    )
    assert value(
        metrics, "sglang_ha_engine_probe_seconds_bucket", node=NODE, probe="canary", le="0.5"
    ) == (engine.canaries)


async def test_every_lease_renewal_is_observed() -> None:
    ha, monitor, _, metrics, _ = build()
    await healthy(monitor)
    assert await ha.run_cycle() == "promoted to primary (epoch 1): no leader was present"
    assert value(metrics, "sglang_ha_lease_renew_seconds_count", node=NODE) == 0
    for _ in range(3):
        assert (await ha.run_cycle()).startswith("renewed lease as primary")
    assert value(metrics, "sglang_ha_lease_renew_seconds_count", node=NODE) == 3


async def test_a_failed_renewal_is_not_a_latency_sample() -> None:
    ha, monitor, _, metrics, _ = build()
    await healthy(monitor)
    await ha.run_cycle()
    await ha.run_cycle()
    assert isinstance(ha.dcs, FakeStore)
    ha.dcs.down = True
    assert "store unreachable" in await ha.run_cycle()
    assert value(metrics, "sglang_ha_lease_renew_seconds_count", node=NODE) == 1
    assert value(metrics, "sglang_ha_degraded", node=NODE) == 1


async def test_role_epoch_and_last_transition() -> None:
    ha, monitor, _, metrics, clock = build()
    assert value(metrics, "sglang_ha_is_primary", node=NODE) == 0
    assert "sglang_ha_last_transition_timestamp_seconds" not in families(metrics)
    await healthy(monitor)
    await ha.run_cycle()
    assert value(metrics, "sglang_ha_is_primary", node=NODE) == 1
    assert value(metrics, "sglang_ha_role", node=NODE, role="primary") == 1
    assert value(metrics, "sglang_ha_epoch", node=NODE) == 1
    assert value(metrics, "sglang_ha_role_transitions_total", node=NODE) == 1
    assert ha.state.last_transition is not None
    became_primary = value(
        metrics, "sglang_ha_last_transition_timestamp_seconds", node=NODE, role="primary"
    )
    assert became_primary == ha.state.last_transition.at
    # The store goes away and the lease runs out: the node fences itself.
    assert isinstance(ha.dcs, FakeStore)
    ha.dcs.down = True
    clock.advance(5.0)
    await ha.run_cycle()
    assert value(metrics, "sglang_ha_is_primary", node=NODE) == 0
    assert value(metrics, "sglang_ha_role_transitions_total", node=NODE) == 2
    assert (
        value(metrics, "sglang_ha_last_transition_timestamp_seconds", node=NODE, role="primary")
        is None
    )
    assert (
        value(metrics, "sglang_ha_last_transition_timestamp_seconds", node=NODE, role="standby")
        is not None
    )


async def test_engine_state_is_one_hot() -> None:
    _, monitor, _, metrics, _ = build()
    assert value(metrics, "sglang_ha_engine_state", node=NODE, state="starting") == 1
    assert value(metrics, "sglang_ha_engine_healthy", node=NODE) == 0
    await healthy(monitor)
    states = {
        s.labels["state"]: s.value for s in families(metrics)["sglang_ha_engine_state"].samples
    }
    assert states == {"starting": 0, "healthy": 1, "hung": 0, "dead": 0}
    assert value(metrics, "sglang_ha_engine_healthy", node=NODE) == 1


def test_gpu_memory_per_gpu() -> None:
    nvml = FakeNvml([(30 * GiB, 80 * GiB), (5 * GiB, 80 * GiB)])
    *_, metrics, _ = build(GpuCollector(NODE, nvml))  # type: ignore[arg-type]
    assert value(metrics, "sglang_ha_gpu_memory_used_bytes", node=NODE, gpu="0") == 30 * GiB
    assert value(metrics, "sglang_ha_gpu_memory_used_bytes", node=NODE, gpu="1") == 5 * GiB
    assert value(metrics, "sglang_ha_gpu_memory_total_bytes", node=NODE, gpu="1") == 80 * GiB
    assert value(metrics, "sglang_ha_gpu_utilization_ratio", node=NODE, gpu="0") == 0.75
    assert (
        value(
            metrics,
            "sglang_ha_gpu_info",
            node=NODE,
            gpu="1",
            name="NVIDIA H100 80GB HBM3",
            uuid="GPU-0001",
        )
        == 1
    )


def test_a_lost_gpu_is_skipped_and_counted() -> None:
    nvml = FakeNvml([(1 * GiB, 80 * GiB), (2 * GiB, 80 * GiB)], broken={0})
    *_, metrics, _ = build(GpuCollector(NODE, nvml))  # type: ignore[arg-type]
    assert value(metrics, "sglang_ha_gpu_memory_used_bytes", node=NODE, gpu="0") is None
    assert value(metrics, "sglang_ha_gpu_memory_used_bytes", node=NODE, gpu="1") == 2 * GiB
    errors = value(metrics, "sglang_ha_gpu_read_errors_total", node=NODE)
    assert errors is not None and errors >= 1


def test_no_gpu_means_no_gpu_metrics_and_no_error() -> None:
    *_, metrics, _ = build(GpuCollector(NODE, None))
    assert not [name for name in families(metrics) if name.startswith("sglang_ha_gpu")]


def test_load_nvml_without_the_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    assert load_nvml() is None


def test_load_nvml_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> None:
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", SimpleNamespace(nvmlInit=no_driver))
    assert load_nvml() is None


def test_load_nvml_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([(0, 80 * GiB)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert load_nvml() is nvml
