"""What the Helm chart relies on when Kubernetes stops a node's pod, on the CPU stack.

Kubernetes runs the preStop hook, then sends SIGTERM to the container's PID 1 and
kills it after terminationGracePeriodSeconds. Here the chart's own preStop script
(charts/sglang-ha/files/prestop.py) runs in the primary's node container with the
chart's arguments, then `docker stop` sends the same SIGTERM with the same grace, under
continuous load through the gateway. What a cluster adds (probe periods, endpoint
propagation, kube-proxy) is not exercised: docs/kubernetes.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from ha_agent.config import LeaseTiming
from tests.support.background_load import background_load
from tests.support.processes import wait_until
from tests.support.stack import NODES, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHART = Path(__file__).resolve().parents[2] / "charts/sglang-ha"
PRESTOP = CHART / "files/prestop.py"
# The chart's defaults (values.yaml): lease TTL 2.5 s, drain 60 s; supervisord's
# stopwaitsecs of the engine (30) and the agent (10), as the chart adds them up.
HANDOVER = LeaseTiming(lease_ttl=2.5).handover_wait
DRAIN = 60
GRACE = HANDOVER + DRAIN + 30 + 10


def primary_code(stack: Stack, node: str) -> int:
    try:
        return httpx.get(f"{stack.agent_url(node)}/primary", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_prestop_then_sigterm_moves_the_primary_with_no_failed_request(stack: Stack) -> None:
    primary = stack.wait_stable()
    standby = next(n for n in NODES if n != primary)
    container = stack.container(NODES[primary])
    try:
        with background_load(stack.gateway_url) as load:
            time.sleep(2)
            started = time.monotonic()
            # The preStop exec, as the chart writes it (the script's text, same argv).
            code, out = container.exec_run(
                [
                    "/opt/sglang-ha/bin/python",
                    "-c",
                    PRESTOP.read_text(),
                    f"{HANDOVER:g}",
                    str(DRAIN),
                ]
            )
            prestop_s = time.monotonic() - started
            log = out.decode(errors="replace")
            assert code == 0, log
            assert "stepped down" in log and "drained" in log, log
            # Readiness follows the role: the old primary answers 503 at once, the
            # standby 200 within a lease TTL of the step-down.
            assert primary_code(stack, primary) == 503
            wait_until(
                lambda: primary_code(stack, standby) == 200,
                timeout=2.5,
                what=f"{standby} /primary 200 within 2.5 s of the step-down",
            )
            stop_started = time.monotonic()
            container.stop(timeout=int(GRACE - prestop_s))
            stop_s = time.monotonic() - stop_started
            time.sleep(3)
        assert not load.failed, load.summary()
        assert not load.mismatched, load.summary()
        assert load.records, load.summary()
        # SIGTERM ended it well inside the grace: supervisord's stop, not the SIGKILL.
        assert prestop_s + stop_s < GRACE, (prestop_s, stop_s)
        assert stop_s < 30 + 10, stop_s
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0, container.attrs["State"]
    finally:
        stack.start_container(primary)
    assert stack.wait_stable(timeout=120) == standby


def test_a_node_back_under_a_new_address_is_followed_by_the_gateway(stack: Stack) -> None:
    """A pod restarted by Kubernetes comes back under the same DNS name with a new IP.
    Here: the standby's container leaves the stack's network and joins it again under
    the same aliases, which gives it another address; the relay, which dials nodes
    by name, must reach it there once it is primary."""
    primary = stack.wait_stable()
    standby = next(n for n in NODES if n != primary)
    service = NODES[standby]
    container = stack.container(service)
    old_ip = stack.ip(service)
    (net_name, settings), *_ = container.attrs["NetworkSettings"]["Networks"].items()
    aliases = [a for a in settings.get("Aliases") or [] if a != container.id[:12]]
    network = stack.client.networks.get(net_name)
    container.stop(timeout=30)
    network.disconnect(container)
    # Docker would give the node its freed address again: a placeholder takes it first.
    placeholder = stack.client.containers.run(
        container.image.id,
        entrypoint=["sleep", "600"],
        detach=True,
        network=net_name,
        labels={"com.docker.compose.project": stack.project},
    )
    try:
        network.connect(container, aliases=aliases or [service])
        container.start()
    finally:
        placeholder.remove(force=True)
    new_ip = stack.ip(service)
    assert new_ip != old_ip, f"{service} got its old address {old_ip} back"
    restarted = time.monotonic()
    stack.wait_stable(timeout=120)
    with background_load(stack.gateway_url) as load:
        time.sleep(2)
        # The primary's agent refuses a switchover to a node it does not see healthy:
        # accepted only once the names resolve to the new address. Bounded by 30 s
        # from the restart (the relay's resolver keeps an answer 5 s).
        refusals: list[str] = []
        while True:
            code, out = container.exec_run(["sglang-ha", "switchover", "--to", standby])
            if code == 0:
                break
            refusals.append(out.decode(errors="replace").strip())
            assert time.monotonic() - restarted < 30, refusals
            time.sleep(1)
        followed_s = time.monotonic() - restarted
        time.sleep(3)
    print(
        f"switchover to the readdressed node accepted {followed_s:.1f}s after its restart"
        f" ({len(refusals)} refused before)"
    )
    assert not load.failed, load.summary()
    # One primary, and the relay settled and routing to it (ClusterView.wait_stable).
    assert stack.wait_stable() == standby


def test_the_cpu_node_image_runs_as_the_chart_starts_it(stack: Stack, tmp_path: Path) -> None:
    """The chart's node container (command, env, user, read-only root, no capability,
    secrets as files), from the rendered chart, on the CPU node image, with no Redis
    reachable: the agent must answer /liveness (the kubelet never restarts it for a
    store outage), /readiness (engine healthy) and /primary 503."""
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    values = yaml.safe_load((CHART / "values-pair-cpu.yaml").read_text())
    out = helm.Chart.load(CHART).render(values, name="demo", namespace="ai", is_install=True)
    sts = next(
        d
        for path, text in out.items()
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d and d.get("kind") == "StatefulSet" and d["metadata"]["name"].endswith("-node")
    )
    pod = sts["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    name = "demo-sglang-ha-node-0"
    env = {e["name"]: e["value"] for e in node["env"] if "value" in e}
    env = {k: v.replace("$(POD_NAME)", name) for k, v in env.items()}
    env["POD_NAME"] = name
    env["HA_SENTINELS"] = "127.0.0.1:1"  # nothing answers: a store outage
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for item in next(v for v in pod["volumes"] if v["name"] == "secrets")["projected"]["sources"][
        0
    ]["secret"]["items"]:
        (secrets / item["path"]).write_text(f"test-{item['key']}\n")
        (secrets / item["path"]).chmod(0o444)
    sc, psc = node["securityContext"], pod["securityContext"]
    tmpfs = {
        m["mountPath"]: f"uid={psc['runAsUser']},gid={psc['fsGroup']}"
        for m in node["volumeMounts"]
        if m["name"] in ("run", "tmp", "logs")
    }
    image = stack.container("node-1").image.id
    container = stack.client.containers.run(
        image,
        entrypoint=node["command"][:2],
        command=node["command"][2:],
        environment=env,
        user=f"{psc['runAsUser']}:{psc['runAsGroup']}",
        read_only=sc["readOnlyRootFilesystem"],
        cap_drop=sc["capabilities"]["drop"],
        security_opt=["no-new-privileges"],
        tmpfs=tmpfs,
        volumes={str(secrets): {"bind": "/run/secrets", "mode": "ro"}},
        detach=True,
        labels={"com.docker.compose.project": stack.project},
    )
    try:
        container.reload()
        ip = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]

        def code(path: str) -> int:
            try:
                return httpx.get(f"http://{ip}:8008{path}", timeout=2).status_code
            except httpx.HTTPError:
                return 0

        wait_until(lambda: code("/readiness") == 200, timeout=60, what="engine healthy")
        assert code("/liveness") == 200
        assert code("/primary") == 503
        _, environ = container.exec_run(
            ["sh", "-c", "tr '\\0' '\\n' < /proc/$(pgrep -f sglang-ha-agent | head -1)/environ"]
        )
        peers = [
            line.split("=", 1)[1]
            for line in environ.decode().splitlines()
            if line.startswith("HA_PEERS=")
        ]
        assert peers == [env["HA_ALL_AGENTS"].split(",")[1]], peers
    finally:
        container.remove(force=True)
