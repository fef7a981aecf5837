"""The agent's Prometheus metrics, read from the live HA state at scrape time.

A collector rather than gauges set from the loop: the numbers can never go stale
or disagree with /ha/status. Latencies are the exception: every lease renewal and
engine probe is observed into a histogram as it happens (a value read at scrape
time would show one sample in thousands). GPU memory comes from NVML (gpu.py)
where a GPU exists. Every name is documented in docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ha_agent.dcs.base import EngineState, Role
from ha_agent.node.gpu import GpuCollector, load_nvml

if TYPE_CHECKING:
    from ha_agent.node.engine_restart import EngineRestarter
    from ha_agent.node.ha import Ha


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.renew_latency = Histogram(
            "sglang_ha_lease_renew_seconds",
            "Latency of one lease renewal in Redis (the heartbeat).",
            ["node"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.probe_latency = Histogram(
            "sglang_ha_engine_probe_seconds",
            "Latency of the agent's answered engine probes: metrics (a /metrics read)"
            " or canary (a one-token generation).",
            ["node", "probe"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.engine_auto_restarts = Counter(
            "sglang_ha_engine_auto_restarts",
            "Automatic restarts of this node's hung engine, by outcome (ok: supervisord"
            " started a new one; failed: it did not in time).",
            ["node", "outcome"],
            registry=self.registry,
        )
        self.auth_rejected = Counter(
            "sglang_ha_agent_auth_rejected",
            "Admin requests rejected for a missing or wrong token.",
            ["endpoint"],
            registry=self.registry,
        )

    def attach(self, ha: Ha, gpu: GpuCollector | None = None) -> None:
        """Read `ha` at scrape time, feed the latency histograms, add GPUs if any."""
        self.registry.register(_HaCollector(ha))
        # Children made now, so the series exist (at zero) before the first sample.
        ha.renew_observers.append(self.renew_latency.labels(ha.name).observe)
        probes = {p: self.probe_latency.labels(ha.name, p) for p in ("metrics", "canary")}
        ha.engine.probe_observers.append(lambda probe, seconds: probes[probe].observe(seconds))
        self.registry.register(gpu or GpuCollector(ha.name, load_nvml()))

    def attach_restarter(self, restarter: EngineRestarter) -> None:
        outcomes = {
            o: self.engine_auto_restarts.labels(restarter.ha.name, o) for o in ("ok", "failed")
        }
        restarter.observers.append(lambda outcome: outcomes[outcome].inc())


class _HaCollector(Collector):
    def __init__(self, ha: Ha) -> None:
        self.ha = ha

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ha = self.ha
        node = ha.name
        role = GaugeMetricFamily(
            "sglang_ha_role", "1 for the node's current role.", labels=["node", "role"]
        )
        primary = ha.is_primary()
        role.add_metric([node, Role.PRIMARY.value], 1.0 if primary else 0.0)
        role.add_metric([node, Role.STANDBY.value], 0.0 if primary else 1.0)
        yield role
        yield _gauge("sglang_ha_is_primary", "1 while this node serves as primary.", node, primary)
        yield _gauge(
            "sglang_ha_serving",
            "1 while this node takes new requests (pair: the primary; pool: in service).",
            node,
            ha.is_serving(),
        )
        yield _gauge("sglang_ha_epoch", "Fencing epoch held or last seen.", node, ha.state.epoch)
        yield _gauge(
            "sglang_ha_lease_time_left_seconds",
            "Seconds before this primary fences itself.",
            node,
            ha.lease_time_left(),
        )
        yield _gauge(
            "sglang_ha_degraded",
            "1 while the coordination store is unreachable.",
            node,
            ha.state.degraded,
        )
        yield _gauge(
            "sglang_ha_paused", "1 while automatic actions are paused.", node, ha.state.paused
        )
        health = GaugeMetricFamily(
            "sglang_ha_engine_state",
            "1 for the engine's current health state.",
            labels=["node", "state"],
        )
        current = ha.engine.health.state
        for state in EngineState:
            health.add_metric([node, state.value], 1.0 if state is current else 0.0)
        yield health
        yield _gauge(
            "sglang_ha_engine_healthy",
            "1 while the engine is judged healthy.",
            node,
            current is EngineState.HEALTHY,
        )
        yield _counter(
            "sglang_ha_role_transitions", "Role changes of this node.", node, ha.transitions_total
        )
        yield _counter(
            "sglang_ha_failovers",
            "Failovers this node carried out (it became primary).",
            node,
            ha.failovers_total,
        )
        last = ha.state.last_transition
        if last is not None:
            # Only _become() sets both, so the last transition led to the current role.
            moved = GaugeMetricFamily(
                "sglang_ha_last_transition_timestamp_seconds",
                "Unix time of this node's last role change, labelled with the role it took.",
                labels=["node", "role"],
            )
            moved.add_metric([node, ha.state.role.value], last.at)
            yield moved
        yield _gauge(
            "sglang_ha_last_cycle_age_seconds",
            "Seconds since the HA loop last completed.",
            node,
            ha.clock() - ha.last_cycle_at,
        )


def _gauge(name: str, doc: str, node: str, value: float | bool | int) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["node"])
    family.add_metric([node], float(value))
    return family


def _counter(name: str, doc: str, node: str, value: int) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["node"])
    family.add_metric([node], float(value))
    return family
