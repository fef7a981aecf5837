"""`make up MODE=... NODES=...`: scripts/stack-nodes.sh and the stack it describes.

The script runs on a copy of compose/, prometheus/ and scripts/, so that the test never
touches the checkout's own generated files; `docker compose config` (no container) reads
the result where Docker is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "stack-nodes.sh", tmp_path / "scripts")
    shutil.copytree(ROOT / "prometheus", tmp_path / "prometheus")
    shutil.copytree(
        ROOT / "compose",
        tmp_path / "compose",
        ignore=shutil.ignore_patterns("secrets", "models", "*.generated.*"),
    )
    return tmp_path


def generate(tree: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(tree / "scripts" / "stack-nodes.sh"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def compose_config(tree: Path, *files: str) -> dict[str, Any]:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    secrets = tree / "compose" / "secrets"
    secrets.mkdir(exist_ok=True)
    for name in [
        "engine_api_key",
        "redis_password",
        "redis_sentinel_password",
        "redis_sentinel_password.sha256",
        "ha_redis_password",
        "ha_redis_password.sha256",
        "ha_sentinel_password",
        "ha_admin_token",
        "sim_admin_token",
        "hf_token",
    ]:
        (secrets / name).write_text("x\n")
    args = ["docker", "compose", "-p", "stacktest"]
    for f in files:
        args += ["-f", str(tree / "compose" / f)]
    result = subprocess.run(
        [*args, "--profile", "monitoring", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_the_default_pair_is_the_checked_in_stack(tree: Path) -> None:
    (tree / "compose" / "stack.generated.yaml").write_text("stale\n")
    result = generate(tree, "pair", "2", "compose.yaml")
    assert result.returncode == 0, result.stderr
    assert not (tree / "compose" / "stack.generated.yaml").exists()
    assert not (tree / "compose" / "stack.prometheus.generated.yml").exists()
    config = compose_config(tree, "compose.yaml")
    nodes = sorted(s for s in config["services"] if s.startswith("node-"))
    assert nodes == ["node-1", "node-2"]
    assert config["services"]["gateway"]["environment"]["HA_MODE"] == "pair"
    assert config["services"]["node-1"]["environment"]["HA_MODE"] == "pair"


def test_a_pool_of_three_lists_every_node_everywhere(tree: Path) -> None:
    result = generate(tree, "pool", "3", "compose.yaml")
    assert result.returncode == 0, result.stderr
    config = compose_config(tree, "compose.yaml", "stack.generated.yaml")
    services = config["services"]
    assert sorted(s for s in services if s.startswith("node-")) == ["node-1", "node-2", "node-3"]
    node3 = services["node-3"]
    env = node3["environment"]
    assert node3["hostname"] == "node-3"
    assert env["HA_NODE_NAME"] == env["SIM_INSTANCE_NAME"] == "sglang-03"
    assert env["HA_ADVERTISE_ENGINE_URL"] == "http://node-3:30000"
    assert env["HA_ADVERTISE_API_URL"] == "http://node-3:8008"
    # Its own logs, the same secrets and hardening as the others.
    logs = {v["target"]: v["source"] for v in node3["volumes"]}
    assert logs["/var/log/sglang"] == "node-3-logs"
    assert node3["secrets"] == services["node-2"]["secrets"]
    assert node3["read_only"] and node3["cap_drop"] == ["ALL"]
    for i in (1, 2, 3):
        env = services[f"node-{i}"]["environment"]
        assert env["HA_MODE"] == "pool"
        peers = {f"http://node-{j}:8008" for j in (1, 2, 3) if j != i}
        assert set(env["HA_PEERS"].split(",")) == peers
    gateway = services["gateway"]["environment"]
    assert gateway["HA_MODE"] == "pool"
    seeds = [s.split("=")[0] for s in gateway["HA_NODES"].split(",")]
    assert seeds == ["sglang-01", "sglang-02", "sglang-03"]
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    generated = tree / "compose" / "stack.prometheus.generated.yml"
    assert mounts["/etc/sglang-ha/prometheus/prometheus.yml"] == str(generated)


def test_the_generated_scrape_config_has_every_node(tree: Path) -> None:
    assert generate(tree, "pool", "3", "compose.yaml").returncode == 0
    generated = tree / "compose" / "stack.prometheus.generated.yml"
    config = yaml.safe_load(generated.read_text())
    for job, port in (("sglang-ha-agent", 8008), ("sglang-engine", 30000)):
        (scrape,) = [j for j in config["scrape_configs"] if j["job_name"] == job]
        targets = [(c["targets"], c["labels"]["node"]) for c in scrape["static_configs"]]
        assert targets == [([f"node-{i}:{port}"], f"sglang-0{i}") for i in (1, 2, 3)]
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: run scripts/ensure-test-tools.sh")
    # Checked where it is mounted: beside the alert rules it names.
    shutil.copy(generated, tree / "prometheus" / "prometheus.yml")
    result = subprocess.run(
        [tool, "check", "config", str(tree / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gpu_stack_gives_each_node_its_own_gpu(tree: Path) -> None:
    assert generate(tree, "pool", "3", "compose.gpu.yaml").returncode == 0
    services = compose_config(tree, "compose.gpu.yaml", "stack.generated.yaml")["services"]
    gpus = [
        services[f"node-{i}"]["deploy"]["resources"]["reservations"]["devices"] for i in (1, 2, 3)
    ]
    assert [[d["device_ids"] for d in devices] for devices in gpus] == [[["0"]], [["1"]], [["2"]]]


@pytest.mark.parametrize(
    ("mode", "nodes"), [("primary", "2"), ("pool", "1"), ("pool", "ten"), ("pool", "10")]
)
def test_a_wrong_mode_or_count_is_refused(tree: Path, mode: str, nodes: str) -> None:
    result = generate(tree, mode, nodes, "compose.yaml")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert not (tree / "compose" / "stack.generated.yaml").exists()
