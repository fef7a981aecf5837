"""The relay's Prometheus metrics.

With several relay workers (ha_agent/gateway/edge/workers.py) PROMETHEUS_MULTIPROC_DIR is
set and prometheus_client keeps each worker's counters and histograms in files
there; `exposed` then sums them over every worker, live or gone, so whichever
worker answers a scrape reports the whole gateway. The topology gauges are read
from the answering worker's own view (every worker follows the same store).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ha_agent.gateway.upstream.topology import Topology

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RelayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "sglang_ha_relay_requests",
            "Requests answered by the relay, by endpoint, serving node ('-' when none"
            " could), outcome (ok, migrated, client_error, client_gone, failed) and code.",
            ["endpoint", "node", "outcome", "code"],
            registry=r,
        )
        self.retries = Counter(
            "sglang_ha_relay_retries",
            "Upstream attempts that failed before the response started and were re-sent.",
            ["node", "reason"],
            registry=r,
        )
        self.migrations = Counter(
            "sglang_ha_relay_migrations",
            "Broken streams, by what the relay did: migrated, refused (ended with an"
            " error event), or failed (no node could continue).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "sglang_ha_relay_request_duration_seconds",
            "Whole-request latency through the relay.",
            ["endpoint", "stream", "code"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "sglang_ha_relay_ttft_seconds",
            "Time to the first streamed event sent to the client.",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inflight = Gauge(
            "sglang_ha_relay_inflight",
            "Requests in flight through the relay.",
            registry=r,
            multiprocess_mode="livesum",  # summed over live workers
        )
        self.refused = Counter(
            "sglang_ha_relay_refused",
            "Requests answered at admission without an engine: reason is limits (too"
            " heavy, 400), shed (primary's queue past its bound, 429), wait (expected"
            " queue wait past its bound, 429) or quarantined (query of death, 503).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.quarantined = Counter(
            "sglang_ha_relay_quarantined",
            "Request fingerprints quarantined after the nodes holding them failed twice.",
            registry=r,
        )
        self.clients = Counter(
            "sglang_ha_relay_client_requests",
            "Requests by client key name ('anonymous' without keys, or without a valid"
            " one: the 401s) and status code, refusals at admission included.",
            ["client", "code"],
            registry=r,
        )
        self.auth_rejected = Counter(
            "sglang_ha_relay_auth_rejected",
            "Admin requests rejected for a missing or wrong token.",
            ["endpoint"],
            registry=r,
        )

        # What /metrics serves: this registry, or the sum over all workers.
        self.exposed = r
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            forget_dead_workers(Path(directory))
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed, path=directory)

    def attach(self, topology: Topology) -> None:
        self.add_collector(_TopologyCollector(topology))

    def add_collector(self, collector: Collector) -> None:
        """Gauges read from this worker's own view when scraped."""
        self.registry.register(collector)
        if self.exposed is not self.registry:
            self.exposed.register(collector)


_LIVE_GAUGE = re.compile(r"gauge_live\w*_(\d+)\.db$")


def forget_dead_workers(directory: Path) -> None:
    """Drop the in-flight gauges of workers that are gone (killed, restarted): a
    dead worker's requests are no longer in flight. Its counters stay counted."""
    for path in directory.glob("gauge_live*.db"):
        match = _LIVE_GAUGE.search(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(directory))
        except PermissionError:
            pass  # alive, another user's


class _TopologyCollector(Collector):
    def __init__(self, topology: Topology) -> None:
        self.t = topology

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        t = self.t
        primary = GaugeMetricFamily(
            "sglang_ha_relay_primary",
            "1 for the node the relay routes to as primary.",
            labels=["node"],
        )
        healthy = GaugeMetricFamily(
            "sglang_ha_relay_node_can_serve",
            "1 while the relay considers the node able to serve.",
            labels=["node"],
        )
        now = t.clock()
        for node in t.nodes.values():
            primary.add_metric([node.name], 1.0 if node.name == t.primary else 0.0)
            healthy.add_metric([node.name], 1.0 if node.can_serve(now) else 0.0)
        yield primary
        yield healthy
        yield GaugeMetricFamily(
            "sglang_ha_relay_epoch", "Highest fencing epoch seen.", value=t.epoch
        )
        yield GaugeMetricFamily(
            "sglang_ha_relay_degraded",
            "1 while the store is unreachable and the relay routes on its own view.",
            value=1.0 if t.degraded else 0.0,
        )
        yield CounterMetricFamily(
            "sglang_ha_relay_leader_changes",
            "Primary changes the relay followed.",
            value=t.leader_changes,
        )
