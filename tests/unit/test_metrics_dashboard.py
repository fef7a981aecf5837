"""The Grafana dashboard and the metrics documentation, checked offline.

Every panel query must be valid PromQL (promtool parses it as a recording rule), use
only documented metrics, and the dashboard must have the panels operators rely on.
Every metric the agent and the relay expose must be documented, with its type, in
docs/observability.md. Whether each query returns data from a live stack is checked
by tests/integration/test_observability.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from ha_agent.config import RelaySettings
from ha_agent.events import EventLog
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.node.gpu import GpuCollector
from tests.support.fakes import FakeClock, FakeStore
from tests.unit.test_metrics_agent import NODE, FakeNvml, build

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "sglang-ha.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DOCS = ROOT / "docs" / "observability.md"

# Names of metrics in PromQL: ours, SGLang's, the exporters', Prometheus's `up`.
METRIC = re.compile(r"\b(sglang_ha_\w+|sglang:\w+|redis_\w+|nginx_\w+|up)\b(?!\s*\()")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


@dataclass(frozen=True)
class Query:
    """One PromQL query of the dashboard: a panel target or an annotation."""

    where: str  # panel title, or "annotation <name>"
    expr: str
    instant: bool = False

    def promql(self, rate_interval: str = "1m", range_: str = "1h", interval: str = "15s") -> str:
        """The query as Grafana sends it (all nodes selected)."""
        return (
            self.expr.replace("$__rate_interval", rate_interval)
            .replace("$__range", range_)
            .replace("$__interval", interval)
            .replace('=~"$node"', '=~".+"')
        )


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    queries = [
        Query(p["title"], t["expr"], bool(t.get("instant")))
        for p in dashboard_panels(dashboard)
        for t in p.get("targets", [])
    ]
    queries += [
        Query(f"annotation {a['name']}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if a.get("expr")
    ]
    return queries


def metric_names(expr: str) -> set[str]:
    return {HISTOGRAM_SUFFIX.sub("", name) for name in METRIC.findall(expr)}


def documented() -> dict[str, str]:
    """docs/observability.md's metric tables: name -> type."""
    rows = re.findall(r"^\| `([^`]+)` \| (gauge|counter|histogram) \|", DOCS.read_text(), re.M)
    return dict(rows)


# -- the dashboard -----------------------------------------------------------------------


def test_every_panel_queries_the_provisioned_datasource() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    dashboard = load_dashboard()
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"]["uid"] == uid


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: run scripts/ensure-test-tools.sh (Debian: prometheus)")
    queries = dashboard_queries(load_dashboard())
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": q.promql()}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_in_the_dashboard_is_documented() -> None:
    docs = set(documented())
    for query in dashboard_queries(load_dashboard()):
        names = metric_names(query.expr)
        assert names, f"{query.where}: no metric found in {query.expr}"
        assert names - docs - {"up"} == set(), query.where


def test_the_panels_operators_rely_on() -> None:
    dashboard = load_dashboard()
    panels = {p["title"]: p for p in dashboard_panels(dashboard)}

    def exprs(title: str) -> str:
        return " ".join(t["expr"] for t in panels[title]["targets"])

    assert "sglang_ha_is_primary" in exprs("Primary online")
    assert "sglang_ha_engine_healthy" in exprs("Standby online")
    per_node = panels["Requests/s on $node"]
    assert per_node["repeat"] == "node" and per_node["repeatDirection"] == "h"
    assert per_node["gridPos"]["w"] <= 12  # two fit side by side
    assert 'node=~"$node"' in exprs("Requests/s on $node")
    for cls in ("2xx", "4xx", "5xx"):
        heatmap = panels[f"Latency heatmap · {cls}"]
        assert heatmap["type"] == "heatmap"
        assert heatmap["targets"][0]["format"] == "heatmap"
        assert f'code=~"{cls[0]}.."' in heatmap["targets"][0]["expr"]
    schemes = {
        panels[f"Latency heatmap · {c}"]["options"]["color"]["scheme"]
        for c in ("2xx", "4xx", "5xx")
    }
    assert len(schemes) == 3, "each status class has its own colour"
    assert "topk(3, sglang_ha_gpu_memory_used_bytes)" in exprs("GPU memory used (top 3)")
    assert "histogram_quantile(0.99" in exprs("Redis heartbeat (lease renew) latency p99")
    assert "sglang_ha_lease_renew_seconds_bucket" in exprs(
        "Redis heartbeat (lease renew) latency p99"
    )
    history = panels["HA history"]
    assert history["type"] == "table"
    assert "sglang_ha_last_transition_timestamp_seconds" in exprs("HA history")
    annotations = " ".join(a.get("expr", "") for a in dashboard["annotations"]["list"])
    assert "sglang_ha_failovers_total" in annotations
    assert "sglang_ha_relay_epoch" in annotations
    variable = dashboard["templating"]["list"][0]
    assert variable["name"] == "node" and "sglang_ha_role" in variable["definition"]


def test_the_dashboard_serves_any_number_of_nodes() -> None:
    """Panels split by the `node` label, never name a node: a 3-node pool (or a pair
    with other names) shows every node, and the share of traffic across them."""
    text = DASHBOARD.read_text()
    assert not re.search(r"sglang-0\d|node-\d", text), "a node named in the dashboard"
    panels = {p["title"]: p for p in dashboard_panels(load_dashboard())}
    share = panels["Share of traffic by node"]
    expr = share["targets"][0]["expr"]
    assert "sum by (node)" in expr and "sglang_ha_relay_requests_total" in expr
    assert 'node!="-"' in expr, "requests no node answered are nobody's share"
    assert share["fieldConfig"]["defaults"]["unit"] == "percentunit"
    routed = panels["Nodes the relay routes to"]["targets"][0]["expr"]
    assert routed == "max by (node) (sglang_ha_relay_node_can_serve)"
    assert panels["Requests/s on $node"]["maxPerRow"] >= 3


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_ids_are_unique() -> None:
    ids = [p["id"] for p in load_dashboard()["panels"]]
    assert len(ids) == len(set(ids))


# -- the documentation -------------------------------------------------------------------


def exposed(registry: CollectorRegistry) -> dict[str, str]:
    """Metric names as scraped (counters with _total) -> type."""
    out = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        out[name] = family.type
    return out


async def test_every_agent_metric_is_documented_with_its_type() -> None:
    *_, metrics, _ = build(GpuCollector(NODE, FakeNvml([(1, 2)])))  # type: ignore[arg-type]
    found = exposed(metrics.registry)
    assert "sglang_ha_gpu_memory_used_bytes" in found  # GPUs included in what is checked
    docs = documented()
    for name, kind in found.items():
        assert docs.get(name) == kind, f"{name} ({kind}) is not documented as such"


async def test_every_relay_metric_is_documented_with_its_type() -> None:
    settings = RelaySettings(nodes=["sglang-01=http://a:30000=http://a:8008"])
    metrics = RelayMetrics()
    metrics.attach(Topology(settings, FakeStore(FakeClock()), EventLog(None, "relay")))
    # Labelled series appear on first use; touch each so that its family is exported.
    metrics.requests.labels("chat", "sglang-01", "ok", "200").inc()
    metrics.retries.labels("sglang-01", "connect").inc()
    metrics.migrations.labels("chat", "migrated").inc()
    metrics.duration.labels("chat", "false", "200").observe(0.1)
    metrics.ttft.labels("chat").observe(0.1)
    metrics.auth_rejected.labels("/relay/status").inc()
    found = exposed(metrics.registry)
    assert len(found) >= 12
    docs = documented()
    for name, kind in found.items():
        assert docs.get(name) == kind, f"{name} ({kind}) is not documented as such"
