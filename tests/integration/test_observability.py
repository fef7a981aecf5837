"""Prometheus against the live CPU stack: every target scraped, every dashboard query
answered, and each alert firing when its fault is injected for real.

The stack runs with the `monitoring` profile (Prometheus and the Redis exporter;
Grafana needs a registry) under its own project name. Its Prometheus reads a copy of
prometheus/ with two changes only: scrape and rule evaluation every 1 s instead of
5 s, and every `for:` divided by 10 (at least 2 s), so each scenario takes seconds,
not minutes. The expressions, labels and annotations are the shipped ones; the full
`for:` durations are pinned by promtool's tests (prometheus/tests/).

The tests run in file order: the scenarios produce the failover, the stream migration
and the errors that the last test expects every dashboard panel to show.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.processes import wait_until
from tests.support.stack import NODES, ROOT, Stack, running_stack
from tests.unit.test_metrics_dashboard import dashboard_queries, load_dashboard

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

# Everything but Grafana, which cannot be pulled here.
SERVICES = [
    "redis-1",
    "redis-2",
    "sentinel-1",
    "sentinel-2",
    "sentinel-3",
    "gateway",
    "node-1",
    "node-2",
    "redis-exporter",
    "prometheus",
]
EXPECTED_TARGETS = {
    "prometheus": 1,
    "sglang-ha-agent": 2,
    "sglang-engine": 2,
    "sglang-ha-relay": 1,
    "nginx": 1,
    "redis": 2,
    "redis-sentinel": 3,
}
ALERT_RULES = ROOT / "prometheus" / "alerts" / "sglang-ha.yaml"
ALERT_NAMES = {
    r["alert"] for g in yaml.safe_load(ALERT_RULES.read_text())["groups"] for r in g["rules"]
}
FOR_DIVISOR = 10
# Engines answer 500 this long: several scrapes, and less than the 5 s of silence
# after which an idle engine gets a canary (which would fail and mark it hung).
FAULT_WINDOW = 3.0


# -- the test's Prometheus configuration ---------------------------------------------------


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h)", duration):
        total += int(number) * units[unit]
    return total


def fast_config(target: Path) -> dict[str, float]:
    """prometheus/ at 1 s intervals with shortened `for:`; returns alert -> for (s)."""
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o755)  # read by the container's prometheus user
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (target / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    rules = yaml.safe_load(ALERT_RULES.read_text())
    holds: dict[str, float] = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            full = seconds(rule["for"])
            short = 0 if full == 0 else max(2, math.ceil(full / FOR_DIVISOR))
            rule["for"] = f"{short}s"
            holds[rule["alert"]] = short
    alerts = target / "alerts"
    alerts.mkdir(exist_ok=True)
    alerts.chmod(0o755)
    (alerts / "sglang-ha.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    for path in (target / "prometheus.yml", alerts / "sglang-ha.yaml"):
        path.chmod(0o644)
    return holds


# -- Prometheus' HTTP API ------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == state]

    def firing(self, name: str, **labels: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self.alerts()
            if a["labels"]["alertname"] == name
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def wait_firing(self, name: str, timeout: float, **labels: str) -> dict[str, Any]:
        try:
            found = wait_until(
                lambda: self.firing(name, **labels),
                timeout=timeout,
                interval=0.5,
                what=f"{name} {labels or ''} firing",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; active now: {self.summary()}") from None
        return found[0]

    def wait_resolved(self, name: str, timeout: float) -> None:
        wait_until(
            lambda: not self.firing(name) and not self.alerts_named(name, "pending"),
            timeout=timeout,
            interval=0.5,
            what=f"{name} resolved",
        )

    def alerts_named(self, name: str, state: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts(state) if a["labels"]["alertname"] == name]

    def summary(self) -> list[str]:
        out = []
        for state in ("pending", "firing"):
            out += [f"{a['labels']['alertname']}({state})" for a in self.alerts(state)]
        return out


# -- the stack -----------------------------------------------------------------------------


@dataclass
class Monitored:
    stack: Stack
    prom: Prometheus
    holds: dict[str, float]  # alert -> its `for:` here, in seconds
    started: float  # wall clock, for range queries over the whole run


@contextlib.contextmanager
def monitored_stack(config_dir: Path) -> Iterator[Stack]:
    """The CPU stack plus Prometheus and the Redis exporter, always removed after."""
    env = {
        "PROMETHEUS_CONFIG_DIR": str(config_dir),
        "PROMETHEUS_PORT": "",  # a free loopback port: never collide with a running demo
    }
    with running_stack(
        prefix="sglang-ha-obs", env=env, profiles=["monitoring"], services=SERVICES
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def mon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    config = tmp_path_factory.mktemp("prometheus")
    holds = fast_config(config)
    with monitored_stack(config) as stack:
        prom = Prometheus(f"http://{stack.ip('prometheus')}:9090")
        wait_until(lambda: prom.query("up"), timeout=60, interval=0.5, what="Prometheus answering")
        yield Monitored(stack, prom, holds, time.time())
        bugs = stack.bug_lines()
        if bugs:
            pytest.fail("components logged BUG lines:\n" + "\n".join(bugs[:20]))


# -- traffic -------------------------------------------------------------------------------


def chat(stack: Stack, max_tokens: int = 8) -> httpx.Response:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": max_tokens,
    }
    return httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body, timeout=30)


def traffic(stack: Stack, requests: int = 10) -> None:
    """2xx unary and streams, and 4xx both from an engine and from the relay itself."""
    for _ in range(requests):
        assert chat(stack).status_code == 200
        body = {"text": "Hi", "stream": True, "sampling_params": {"max_new_tokens": 8}}
        with httpx.stream("POST", f"{stack.gateway_url}/generate", json=body, timeout=30) as r:
            assert r.status_code == 200
            assert any(line == "data: [DONE]" for line in r.iter_lines())
    url = f"{stack.gateway_url}/v1/chat/completions"
    # Invalid requests: no messages, and not JSON at all.
    assert httpx.post(url, json={"model": "default"}, timeout=30).status_code == 400
    assert httpx.post(url, content=b"{not json", timeout=30).status_code == 400


def standby_of(primary: str) -> str:
    return next(n for n in NODES if n != primary)


def grows(prom: Prometheus, expr: str) -> Callable[[], bool]:
    """True once `expr` is above what it is now (a scrape has seen new traffic)."""
    before = prom.value(expr) or 0.0
    return lambda: (prom.value(expr) or 0.0) > before


# -- scraping ------------------------------------------------------------------------------


def test_every_component_is_scraped(mon: Monitored) -> None:
    prom, stack = mon.prom, mon.stack

    def targets_up() -> dict[str, int]:
        up: dict[str, int] = {}
        for t in prom.get("/api/v1/targets")["activeTargets"]:
            if t["health"] == "up":
                up[t["labels"]["job"]] = up.get(t["labels"]["job"], 0) + 1
        return up

    wait_until(
        lambda: targets_up() == EXPECTED_TARGETS,
        timeout=60,
        interval=0.5,
        what=f"every target up (have {targets_up()})",
    )
    # The exporters really reach what they export (password, stub_status).
    assert [float(r["value"][1]) for r in prom.query('redis_up{job="redis"}')] == [1.0, 1.0]
    assert [float(r["value"][1]) for r in prom.query('redis_up{job="redis-sentinel"}')] == [1.0] * 3
    assert prom.value('count(redis_instance_info{job="redis", role="master"})') == 1
    assert prom.value("nginx_up") == 1
    # SGLang's own names from the engines, joined to the nodes by the `node` label.
    engines = prom.query('sglang:num_requests_total{job="sglang-engine"}')
    assert {r["metric"]["node"] for r in engines} == set(NODES)
    # Every alert rule is loaded.
    groups = prom.get("/api/v1/rules")["groups"]
    assert {r["name"] for g in groups for r in g["rules"]} == ALERT_NAMES

    # Latencies are observed as they happen: the primary's renewals and both probes.
    primary = stack.wait_stable()
    renewals = f'sglang_ha_lease_renew_seconds_count{{node="{primary}"}}'
    wait_until(grows(prom, renewals), timeout=30, interval=0.5, what="lease renewals observed")
    for node in NODES:
        probes = f'sglang_ha_engine_probe_seconds_count{{node="{node}", probe="metrics"}}'
        wait_until(grows(prom, probes), timeout=30, interval=0.5, what=f"{node} probes observed")

    # No GPU here: the NVML binding is installed in the node image, yet the GPU
    # families are absent, without error.
    for service in NODES.values():
        code, out = stack.container(service).exec_run(
            ["/opt/sglang-ha/bin/python", "-c", "import pynvml"]
        )
        assert code == 0, out
    for node in NODES:
        metrics = httpx.get(f"{stack.agent_url(node)}/metrics", timeout=5).text
        assert "sglang_ha_is_primary" in metrics
        assert "sglang_ha_gpu_" not in metrics
    traffic(stack)


def test_no_alert_on_a_healthy_stack(mon: Monitored) -> None:
    """Over longer than the longest `for:` of this config, nothing is even pending."""
    mon.stack.wait_stable()
    longest = max(hold for name, hold in mon.holds.items() if name != "SglangHaLeaseRenewSlow")
    deadline = time.monotonic() + longest + 3
    while time.monotonic() < deadline:
        assert mon.prom.summary() == []
        time.sleep(1)


# -- alerts in their scenarios -------------------------------------------------------------


def test_a_paused_standby_raises_no_healthy_standby(mon: Monitored) -> None:
    stack, prom = mon.stack, mon.prom
    primary = stack.wait_stable()
    standby = standby_of(primary)
    stack.pause(standby)
    try:
        alert = prom.wait_firing("SglangHaNoHealthyStandby", timeout=60)
        assert alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["runbook_url"] == "docs/runbook.md#sglanghanohealthystandby"
        down = prom.wait_firing("SglangHaAgentDown", timeout=60, node=standby)
        assert down["annotations"]["description"].startswith(f"The agent of {standby} ")
        assert stack.primary() == primary  # the primary serves on
    finally:
        stack.unpause(standby)
    assert stack.wait_stable() == primary
    prom.wait_resolved("SglangHaNoHealthyStandby", timeout=60)


def test_killing_the_primary_engine_raises_failover(mon: Monitored) -> None:
    """kill -9 of the primary's engine mid-stream: the standby takes over, the stream
    moves with it, and SglangHaFailover names the new primary."""
    stack, prom = mon.stack, mon.prom
    primary = stack.wait_stable()
    standby = standby_of(primary)
    events: list[str] = []
    first_event = threading.Event()

    def stream() -> None:
        body = {
            "text": "Count",
            "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True},
        }
        with httpx.stream("POST", f"{stack.gateway_url}/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    first_event.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_event.wait(timeout=30), "the stream never started"
    stack.signal_engine(primary, "KILL")
    reader.join(timeout=120)
    assert not reader.is_alive()
    assert events and events[-1] == "[DONE]", events[-3:]
    assert not any('"error"' in e for e in events), "the stream broke instead of moving"

    alert = prom.wait_firing("SglangHaFailover", timeout=60, node=standby)
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["description"].startswith(f"{standby} took over as primary")
    assert mon.holds["SglangHaFailover"] == 0  # an event: it fires at once
    migrated = 'sum(sglang_ha_relay_migrations_total{outcome="migrated"})'
    wait_until(lambda: (prom.value(migrated) or 0) >= 1, timeout=30, what="migration counted")
    assert stack.wait_stable(timeout=90) == standby  # the old primary rejoined as standby


def test_a_redis_outage_raises_degraded_mode(mon: Monitored) -> None:
    stack, prom = mon.stack, mon.prom
    stack.wait_stable()
    redis = ["redis-1", "redis-2"]
    for service in redis:
        stack.container(service).stop(timeout=5)
    try:
        for node in NODES:
            alert = prom.wait_firing("SglangHaDegradedMode", timeout=90, node=node)
            assert alert["labels"]["severity"] == "critical"
        prom.wait_firing("SglangHaRedisNoMaster", timeout=60)
        # One alert per Redis server (each scraped on its own schedule).
        for instance in ("redis://redis-1:6379", "redis://redis-2:6379"):
            prom.wait_firing("SglangHaRedisDown", timeout=60, instance=instance)
        assert stack.primary() is not None  # degraded, yet still serving
    finally:
        for service in redis:
            stack.container(service).start()
    stack.wait_stable(timeout=90)
    prom.wait_resolved("SglangHaDegradedMode", timeout=90)
    prom.wait_resolved("SglangHaRedisNoMaster", timeout=60)


def test_engines_answering_500_raise_relay_error_rate(mon: Monitored) -> None:
    stack, prom = mon.stack, mon.prom
    stack.wait_stable()
    assert chat(stack).status_code == 200  # fresh progress: no idle canary during the fault
    statuses: list[int | str] = []
    for node in NODES:
        stack.sim_faults(node, error_rate=1.0)
    try:
        # Errors for a few scrapes, not one burst: rate() cannot see the increments that
        # come before a new series' first scrape (its first value is its baseline).
        deadline = time.monotonic() + FAULT_WINDOW

        def client() -> None:
            while time.monotonic() < deadline:
                try:
                    statuses.append(chat(stack).status_code)
                except httpx.HTTPError as exc:  # reported below, not lost with the thread
                    statuses.append(repr(exc))

        workers = [threading.Thread(target=client) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
    finally:
        for node in NODES:
            stack.sim_faults(node)
    assert len(statuses) >= 4, statuses
    assert all(isinstance(s, int) and s >= 500 for s in statuses), statuses
    alert = prom.wait_firing("SglangHaRelayErrorRateHigh", timeout=60)
    assert alert["labels"]["severity"] == "critical"
    assert re.match(r"[\d.]+% of the requests", alert["annotations"]["description"])
    failed = 'sum(sglang_ha_relay_requests_total{outcome="failed"})'
    assert prom.value(failed) == len(statuses)
    retried = 'sum(sglang_ha_relay_retries_total{reason="http_5xx"})'
    assert (prom.value(retried) or 0) >= 2 * len(statuses)  # both nodes tried each time
    stack.wait_stable(timeout=90)


def test_both_nodes_frozen_raise_no_primary(mon: Monitored) -> None:
    stack, prom = mon.stack, mon.prom
    stack.wait_stable()
    for node in NODES:
        stack.pause(node)
    try:
        alert = prom.wait_firing("SglangHaNoPrimary", timeout=60)
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["description"].startswith("0 nodes have claimed")
    finally:
        for node in NODES:
            stack.unpause(node)
    stack.wait_stable(timeout=90)
    prom.wait_resolved("SglangHaNoPrimary", timeout=60)


# -- the dashboard -------------------------------------------------------------------------


def finite_points(result: list[dict[str, Any]]) -> int:
    points = 0
    for series in result:
        samples = series.get("values") or [series["value"]]
        points += sum(1 for _, v in samples if math.isfinite(float(v)))
    return points


def test_every_dashboard_query_returns_data(mon: Monitored) -> None:
    """Each panel query and annotation, as Grafana sends it, over the whole run."""
    stack, prom = mon.stack, mon.prom
    stack.wait_stable()
    # Recent traffic for the rate() panels; its two 400s come last, so once both are
    # scraped, all of it is.
    rejected = 'sum(sglang_ha_relay_requests_total{outcome="client_error"})'
    before = prom.value(rejected) or 0.0
    traffic(stack, requests=5)
    wait_until(
        lambda: (prom.value(rejected) or 0.0) >= before + 2,
        timeout=30,
        interval=0.5,
        what="the traffic scraped",
    )
    end = time.time()
    span = f"{math.ceil(end - mon.started)}s"
    empty: list[str] = []
    queries = dashboard_queries(load_dashboard())
    assert len(queries) >= 25
    for q in queries:
        expr = q.promql(rate_interval="30s", range_=span, interval="2s")
        instant = q.instant
        result = prom.query(expr) if instant else prom.query_range(expr, mon.started, end, 2)
        if "sglang_ha_gpu_" in q.expr:
            assert result == [], f"{q.where}: GPU data on a host without GPU"
            continue
        if finite_points(result) == 0:
            empty.append(f"{q.where}: {expr}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def test_no_split_brain_was_ever_reported(mon: Monitored) -> None:
    """Through every failover above, two primaries were never seen for long enough."""
    result = mon.prom.query_range(
        'ALERTS{alertname="SglangHaSplitBrain", alertstate="firing"}',
        mon.started,
        time.time(),
        step=1,
    )
    assert result == []
    assert mon.prom.alerts_named("SglangHaSplitBrain", "pending") == []
