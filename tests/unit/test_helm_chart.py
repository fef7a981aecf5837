"""The Helm chart (charts/sglang-ha), rendered offline for every values file.

Helm itself lints and renders (helm-python-sdk: Helm's Go SDK as a library, the
code behind `helm lint` and `helm template`); kubernetes-validate checks every
rendered object against the Kubernetes OpenAPI schema in strict mode (unknown
fields are errors). The rest reads the rendered YAML for what the chart promises:
probes, anti-affinity, PDB, grace, secrets as files only, network segmentation.
No cluster is involved: scheduling, kube-proxy and probe timing are not exercised.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import http.server
import importlib.util
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from ha_agent.config import LeaseTiming

helm = pytest.importorskip(
    "helm_python",
    reason="helm-python-sdk (Helm's Go SDK, the [test] extra) is not installed",
)
kv = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (the [test] extra) is not installed"
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sglang-ha"
VALUES = sorted(CHART.glob("values-*.yaml"))
RELEASE, NAMESPACE = "demo", "ai"
# The chart's kubeVersion floor and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", kv.latest_version())
# Custom resources of the Prometheus operator: no schema in the Kubernetes OpenAPI
# document; PrometheusRule is compared to prometheus/alerts/ instead.
CRDS = {"ServiceMonitor", "PrometheusRule"}
SECRET_KEYS = (
    "redis_password",
    "redis_sentinel_password",
    "ha_redis_password",
    "ha_sentinel_password",
    "ha_admin_token",
    "sim_admin_token",
    "engine_api_key",
    "client_keys",
)

helm.disable_logging()  # the symlinked files/ are announced at INFO on every load


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = helm.Chart.load(CHART).render(
        values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True
    )
    return [
        doc
        for path, text in sorted(out.items())
        if path.endswith((".yaml", ".yml"))
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def load_values(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module", params=VALUES, ids=lambda p: p.stem)
def values_file(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture(scope="module")
def rendered(values_file: Path) -> list[dict[str, Any]]:
    return render(load_values(values_file))


def one(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {len(found)} rendered"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def component(workload: dict[str, Any]) -> str:
    return str(workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def mounted_secret_keys(workload: dict[str, Any]) -> set[str]:
    keys: set[str] = set()
    for volume in workload["spec"]["template"]["spec"]["volumes"]:
        if "secret" in volume:
            pytest.fail(f"{volume['name']}: a whole Secret mounted, not chosen keys")
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                keys |= {item["key"] for item in source["secret"]["items"]}
    return keys


def compose_secrets(file: str, service: str) -> set[str]:
    """The secrets a compose service mounts (anchors resolved by the YAML loader)."""
    data = yaml.safe_load((ROOT / "compose" / file).read_text())
    names: set[str] = set()
    for entry in data["services"][service]["secrets"]:
        names.add(entry["target"] if isinstance(entry, dict) else entry)
    return names


# --- helm lint and helm template ------------------------------------------------------


@pytest.mark.parametrize("path", [CHART / "values.yaml", *VALUES], ids=lambda p: p.stem)
def test_helm_lints_every_values_file_without_warnings(path: Path) -> None:
    report = helm.lint(CHART, load_values(path), strict=True, namespace=NAMESPACE)
    # Severity 1 is INFO (e.g. "icon is recommended"); 2 WARNING, 3 ERROR.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, problems or report["errors"]


def test_every_values_file_renders_the_components(
    values_file: Path, rendered: list[dict[str, Any]]
) -> None:
    kinds = {(component(w), w["kind"]) for w in workloads(rendered)}
    expected = {
        ("node", "StatefulSet"),
        ("redis", "StatefulSet"),
        ("sentinel", "StatefulSet"),
        ("gateway", "Deployment"),
    }
    if load_values(values_file).get("metrics", {}).get("serviceMonitor", {}).get("enabled"):
        expected.add(("redis-exporter", "Deployment"))
    assert kinds == expected
    assert one(rendered, "StatefulSet", "-sentinel")["spec"]["replicas"] == 3


def test_values_files_cover_pair_pool_gpu_and_cpu() -> None:
    combos = set()
    for path in VALUES:
        values = load_values(path)
        combos.add((values["mode"], values["nodes"]["engine"]))
    assert combos == {
        ("pair", "sglang"),
        ("pair", "simulator"),
        ("pool", "sglang"),
        ("pool", "simulator"),
    }


# --- the Kubernetes schema --------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_rendered_objects_are_valid_kubernetes_objects(
    rendered: list[dict[str, Any]], kube_version: str
) -> None:
    checked = 0
    for doc in rendered:
        if doc["kind"] in CRDS:
            continue
        try:
            kv.validate(doc, kube_version, strict=True)
        except kv.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {where}: {exc.message}")
        checked += 1
    assert checked >= 15


def test_the_strict_schema_check_catches_a_misspelt_field() -> None:
    doc = one(render(load_values(CHART / "values-pair-cpu.yaml")), "StatefulSet", "-node")
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, kv.latest_version(), strict=True)


def test_prometheus_rule_is_the_promtool_tested_rule_file() -> None:
    docs = render(load_values(CHART / "values-pair-gpu.yaml"))
    rule = one(docs, "PrometheusRule", "")
    expected = yaml.safe_load((ROOT / "prometheus/alerts/sglang-ha.yaml").read_text())
    assert rule["spec"]["groups"] == expected["groups"]
    monitor = one(docs, "ServiceMonitor", "")
    # The rules select on compose's job names (prometheus/prometheus.yml): every
    # job they name is set on an endpoint, or `up{job=...}` alerts could never fire
    # and the Redis ones would fire for want of series.
    jobs = {
        r["replacement"]
        for e in monitor["spec"]["endpoints"]
        for r in e["relabelings"]
        if r["targetLabel"] == "job"
    }
    named = set(re.findall(r'job="([^"]+)"', yaml.safe_dump(expected)))
    assert named and named <= jobs
    scrape = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    assert jobs <= {j["job_name"] for j in scrape["scrape_configs"]}
    # Every port the ServiceMonitor scrapes is a named port of a Service it selects.
    wanted = monitor["spec"]["selector"]["matchLabels"]
    services = [
        s
        for s in docs
        if s["kind"] == "Service" and wanted.items() <= s["metadata"]["labels"].items()
    ]
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert ports <= {p["name"] for s in services for p in s["spec"]["ports"]}
    # One exporter scrape per Redis member and Sentinel, as compose's static targets.
    targets = [e["params"]["target"][0] for e in monitor["spec"]["endpoints"] if "params" in e]
    assert len(targets) == 5 and len(set(targets)) == 5


def test_grafana_dashboard_is_the_repository_dashboard() -> None:
    cm = one(render(), "ConfigMap", "-dashboards")
    want = json.loads((ROOT / "grafana/dashboards/sglang-ha.json").read_text())
    assert json.loads(cm["data"]["sglang-ha.json"]) == want


# --- probes ------------------------------------------------------------------------------


def test_node_probes_mean_what_they_say(values_file: Path, rendered: list[dict[str, Any]]) -> None:
    node = containers(one(rendered, "StatefulSet", "-node"))[0]
    # Liveness: the agent's HA loop, never the engine (a busy engine stays alive).
    assert node["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "agent"}
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports["agent"] == 8008 and ports["engine"] == 30000
    assert "startupProbe" not in node
    # Readiness follows the role in pair mode; in a pool every healthy engine serves.
    mode = load_values(values_file)["mode"]
    path = {"pair": "/primary", "pool": "/readiness"}[mode]
    assert node["readinessProbe"]["httpGet"] == {"path": path, "port": "agent"}


def test_gateway_probes_do_not_depend_on_the_nodes(rendered: list[dict[str, Any]]) -> None:
    # With no primary every gateway would be unready at once; Nginx's last-resort
    # route to the engines must stay reachable, so the probes check Nginx only.
    gateway = containers(one(rendered, "Deployment", "-gateway"))[0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["tcpSocket"] == {"port": "http"}


def test_the_gateway_runs_a_set_number_of_relay_workers_not_one_per_node_cpu(
    rendered: list[dict[str, Any]],
) -> None:
    # Without a CPU limit the relay would count every CPU of the node (workers.py) and
    # start a worker, and an Nginx worker, per node CPU.
    gateway = containers(one(rendered, "Deployment", "-gateway"))[0]
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["HA_RELAY_WORKERS"] == "2"
    assert "cpu" not in gateway["resources"].get("limits", {})
    values = load_values(CHART / "values.yaml")
    values["gateway"]["relayWorkers"] = 4
    gateway = containers(one(render(values), "Deployment", "-gateway"))[0]
    assert {e["name"]: e.get("value") for e in gateway["env"]}["HA_RELAY_WORKERS"] == "4"


def test_standbys_stay_resolvable_while_not_ready(rendered: list[dict[str, Any]]) -> None:
    svc = one(rendered, "Service", "-node")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    sts = one(rendered, "StatefulSet", "-node")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]


def test_pair_nodes_update_on_delete(values_file: Path, rendered: list[dict[str, Any]]) -> None:
    # A RollingUpdate waits for each pod to be Ready: a standby never is in a pair.
    strategy = one(rendered, "StatefulSet", "-node")["spec"]["updateStrategy"]["type"]
    mode = load_values(values_file)["mode"]
    assert strategy == {"pair": "OnDelete", "pool": "RollingUpdate"}[mode]


# --- placement, disruption, stop ---------------------------------------------------------


def test_gpu_nodes_are_spread_across_hosts_one_gpu_each(values_file: Path) -> None:
    values = load_values(values_file)
    sts = one(render(values), "StatefulSet", "-node")
    spec = sts["spec"]["template"]["spec"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    limits = spec["containers"][0]["resources"]["limits"]
    anti = spec["affinity"]["podAntiAffinity"]
    if values["nodes"]["engine"] == "simulator":
        assert "nvidia.com/gpu" not in limits
        return
    assert limits["nvidia.com/gpu"] == 1
    (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()


def test_gateway_has_two_replicas_and_a_pdb(rendered: list[dict[str, Any]]) -> None:
    gateway = one(rendered, "Deployment", "-gateway")
    pdb = one(rendered, "PodDisruptionBudget", "-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert gateway["spec"]["replicas"] >= 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < gateway["spec"]["replicas"]
    svc = one(rendered, "Service", "-gateway")
    assert svc["spec"]["selector"].items() <= labels.items()


def supervisord_stopwaitsecs() -> dict[str, int]:
    conf = configparser.RawConfigParser()
    conf.read(ROOT / "images/node/supervisord.conf")
    programs = [s for s in conf.sections() if s.startswith("program:")]
    return {s.split(":", 1)[1]: conf.getint(s, "stopwaitsecs") for s in programs}


@pytest.mark.parametrize("lease_ttl,drain", [(2.5, 60), (5.0, 120), (3.0, 0)])
def test_grace_covers_handover_drain_and_engine_stop(lease_ttl: float, drain: int) -> None:
    docs = render({"ha": {"leaseTtl": lease_ttl}, "nodes": {"drainTimeout": drain}})
    spec = one(docs, "StatefulSet", "-node")["spec"]["template"]["spec"]
    handover = LeaseTiming(lease_ttl=lease_ttl, safety_margin=lease_ttl / 5).handover_wait
    stops = supervisord_stopwaitsecs()
    need = handover + drain + stops["engine"] + stops["agent"]
    assert spec["terminationGracePeriodSeconds"] >= need
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[-2:] == [f"{handover:g}", str(drain)]


def test_a_grace_shorter_than_the_stop_is_refused() -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds=30 is shorter"):
        render({"nodes": {"terminationGracePeriodSeconds": 30}})


def test_pool_is_refused_unless_acknowledged() -> None:
    with pytest.raises(helm.HelmError, match="pool mode is not implemented"):
        render({"mode": "pool", "nodes": {"replicas": 3}})
    with pytest.raises(helm.HelmError, match="exactly 2 nodes"):
        render({"mode": "pair", "nodes": {"replicas": 3}})


# --- secrets -------------------------------------------------------------------------------


def test_no_secret_reaches_an_environment(rendered: list[dict[str, Any]]) -> None:
    for w in workloads(rendered):
        for c in containers(w):
            assert "envFrom" not in c
            for env in c.get("env", []):
                assert "secretKeyRef" not in env.get("valueFrom", {}), (w["kind"], env)


def test_no_secret_value_appears_outside_its_secret() -> None:
    given = {key: f"value-of-{key}-0123456789" for key in SECRET_KEYS}
    docs = render({"secrets": {"values": given}})
    secret = one(docs, "Secret", "-secrets")
    assert set(SECRET_KEYS) <= set(secret["data"])
    rest = yaml.safe_dump([d for d in docs if d is not secret])
    for value in given.values():
        assert value not in rest


def test_each_component_mounts_the_secrets_compose_gives_it(values_file: Path) -> None:
    docs = render(load_values(values_file))
    engine = load_values(values_file)["nodes"]["engine"]
    node_compose = (
        compose_secrets("nodes-cpu.yaml", "node-1")
        if engine == "simulator"
        else compose_secrets("nodes-gpu.yaml", "node-1")
    )
    expected = {
        "node": node_compose,
        # Edge TLS is compose's alone so far: the chart's gateway is a ClusterIP
        # Service in plain HTTP (docs/security.md, Known limits).
        "gateway": compose_secrets("control.yaml", "gateway")
        - {"gateway_tls.crt", "gateway_tls.key"},
        "redis": compose_secrets("control.yaml", "redis-1"),
        "sentinel": compose_secrets("control.yaml", "sentinel-1"),
        "redis-exporter": compose_secrets("monitoring.yaml", "redis-exporter"),
    }
    for w in workloads(docs):
        assert mounted_secret_keys(w) == expected[component(w)], component(w)
        for c in containers(w):
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["secrets"]["mountPath"] == "/run/secrets"
            assert mounts["secrets"]["readOnly"] is True


def test_secrets_are_kept_across_upgrades_and_hashes_match() -> None:
    docs = render({"secrets": {"values": {"ha_redis_password": "p"}}})
    data = one(docs, "Secret", "-secrets")["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert decoded["ha_redis_password.sha256"] == hashlib.sha256(b"p").hexdigest()
    assert len(decoded["engine_api_key"]) >= 32
    # `helm template` has no cluster to read the old Secret from; on an upgrade the
    # lookup returns it and the values are kept (this annotation keeps it on delete).
    meta = one(docs, "Secret", "-secrets")["metadata"]
    assert meta["annotations"]["helm.sh/resource-policy"] == "keep"


def test_an_existing_secret_is_used_instead() -> None:
    docs = render({"secrets": {"existingSecret": "mine"}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    for w in workloads(docs):
        (volume,) = [v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets"]
        assert volume["projected"]["sources"][0]["secret"]["name"] == "mine"


# --- security context ----------------------------------------------------------------------


def test_every_container_is_locked_down(values_file: Path, rendered: list[dict[str, Any]]) -> None:
    engine = load_values(values_file)["nodes"]["engine"]
    for w in workloads(rendered):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            # Writable root only where SGLang's own caches are not mapped yet (GPU).
            gpu_node = component(w) == "node" and engine == "sglang"
            assert sc["readOnlyRootFilesystem"] is not gpu_node
            assert "memory" in c["resources"]["limits"] and c["resources"]["requests"]


# --- network policies ----------------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def ingress_to(docs: list[dict[str, Any]], labels: dict[str, str], port: int) -> list[Any]:
    """The `from` lists of every rule that admits traffic to PORT of pods with LABELS
    (None for a rule without `from`: anyone)."""
    sources: list[Any] = []
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        if not selects(np["spec"]["podSelector"], labels):
            continue
        for rule in np["spec"].get("ingress", []):
            rule_ports = [p["port"] for p in rule.get("ports", [])]
            if not rule_ports or port in rule_ports:
                sources.append(rule.get("from"))
    return sources


COMPONENTS = ("node", "gateway", "redis", "sentinel", "redis-exporter")


def pod_labels(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    for w in workloads(docs):
        if component(w) == name:
            labels: dict[str, str] = w["spec"]["template"]["metadata"]["labels"]
            return labels
    # Not rendered: labels no policy selects (the chart's selector labels + component).
    return {"app.kubernetes.io/component": name}


def admitted(docs: list[dict[str, Any]], target: str, port: int) -> set[str]:
    """The components allowed to reach TARGET:PORT ('*' for anyone)."""
    who: set[str] = set()
    for sources in ingress_to(docs, pod_labels(docs, target), port):
        if sources is None:
            who.add("*")
            continue
        for peer in sources:
            assert set(peer) == {"podSelector"}, peer  # no namespace-wide openings
            for name in COMPONENTS:
                if selects(peer["podSelector"], pod_labels(docs, name)):
                    who.add(name)
    return who


def test_every_pod_is_under_a_default_deny_ingress_policy(rendered: list[dict[str, Any]]) -> None:
    deny = [
        d
        for d in rendered
        if d["kind"] == "NetworkPolicy"
        and "Ingress" in d["spec"]["policyTypes"]
        and not d["spec"].get("ingress")
    ]
    assert deny
    for w in workloads(rendered):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(selects(d["spec"]["podSelector"], labels) for d in deny), component(w)


def test_network_segmentation_matches_compose(
    values_file: Path, rendered: list[dict[str, Any]]
) -> None:
    exporter = (
        {"redis-exporter"}
        if any(component(w) == "redis-exporter" for w in workloads(rendered))
        else set()
    )
    # The engine: only the relay (its own agent uses loopback, which no policy sees).
    assert admitted(rendered, "node", 30000) == {"gateway"}
    # The agent: the relay and the other agents.
    assert admitted(rendered, "node", 8008) == {"gateway", "node"}
    # Redis and the Sentinels: only what uses them.
    assert admitted(rendered, "redis", 6379) == {"node", "gateway", "redis", "sentinel"} | exporter
    assert admitted(rendered, "sentinel", 26379) == {"node", "gateway", "sentinel"} | exporter
    # Clients reach the gateway's port, and nothing else of it.
    assert admitted(rendered, "gateway", 8000) == {"*"}
    assert admitted(rendered, "gateway", 8002) == set()
    if exporter:
        assert admitted(rendered, "redis-exporter", 9121) == set()


def test_metrics_openings_are_limited_to_the_metrics_ports() -> None:
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    docs = render({"networkPolicy": {"metricsFrom": [scraper]}})
    node = pod_labels(docs, "node")
    assert scraper in [p for s in ingress_to(docs, node, 8008) if s for p in s]
    assert scraper not in [p for s in ingress_to(docs, node, 30000) if s for p in s]


# --- preStop ------------------------------------------------------------------------------------


class FakeAgent(http.server.BaseHTTPRequestHandler):
    """The agent's /ha/status and /ha/switchover, as ha_agent/node/api.py answers."""

    state: ClassVar[dict[str, Any]] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        s = self.state
        if s["switch_requested"]:
            s["polls_after_switch"] += 1
            if s["polls_after_switch"] >= 2:
                s["role"] = "standby"
            if s["polls_after_switch"] >= 4:
                s["running"] = 0
        body = json.dumps(
            {"role": s["role"], "engine": {"running": s["running"], "queued": 0}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        ok = self.headers.get("Authorization") == "Bearer the-token"
        self.state["switch_requested"] = ok and self.path.startswith("/ha/switchover")
        self.send_response(202 if ok else 401)
        self.end_headers()


@pytest.fixture
def fake_agent() -> Iterator[tuple[str, dict[str, Any]]]:
    state = {"role": "primary", "running": 2, "switch_requested": False, "polls_after_switch": 0}
    FakeAgent.state = state
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAgent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        thread.join(timeout=5)


def load_prestop() -> Any:
    spec = importlib.util.spec_from_file_location("prestop", CHART / "files/prestop.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prestop_hands_over_then_waits_for_the_drain(
    fake_agent: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, state = fake_agent
    prestop = load_prestop()
    (tmp_path / "token").write_text("the-token\n")
    prestop.AGENT, prestop.TOKEN_FILE = url, str(tmp_path / "token")
    prestop.main(handover=10, drain=10)
    assert state["switch_requested"] is True
    assert state["role"] == "standby" and state["running"] == 0


def test_prestop_gives_up_within_its_bounds(tmp_path: Path) -> None:
    prestop = load_prestop()
    prestop.AGENT = "http://127.0.0.1:9"  # nothing listens: the agent is gone
    prestop.TOKEN_FILE = str(tmp_path / "missing")
    started = time.monotonic()
    prestop.main(handover=1, drain=1)
    assert time.monotonic() - started < 5


def test_each_node_names_every_other_agent_as_a_peer_and_not_itself() -> None:
    sts = one(render(load_values(CHART / "values-pool-cpu.yaml")), "StatefulSet", "-node")
    node = containers(sts)[0]
    env = {e["name"]: e.get("value") for e in node["env"]}
    script = node["command"][-1]
    assert script.rstrip().endswith("exec /etc/sglang-ha/entrypoint.sh")
    probe = script.replace("exec /etc/sglang-ha/entrypoint.sh", 'echo "$HA_PEERS"')
    agents = env["HA_ALL_AGENTS"].split(",")
    assert len(agents) == 3
    for i in range(3):
        pod = f"{RELEASE}-sglang-ha-node-{i}"
        out = subprocess.run(
            ["sh", "-c", probe],
            env={"PATH": "/usr/bin:/bin", "POD_NAME": pod, "HA_ALL_AGENTS": env["HA_ALL_AGENTS"]},
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        assert out.split(",") == [a for a in agents if not a.startswith(f"http://{pod}.")]
        assert len(out.split(",")) == 2
