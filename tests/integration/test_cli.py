"""`sglang-ha`, the operator's tool, driven inside a node container of the CPU stack:
status as JSON/YAML/watch, restart and rolling-restart under load with no request
failing, edit-config changing the failback policy and the lease timing live, and
remove decommissioning a stopped node."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests.support.background_load import background_load
from tests.support.processes import wait_until
from tests.support.stack import NODES, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def ctl(stack: Stack, *args: str, service: str = "node-1") -> tuple[int, str]:
    code, out = stack.container(service).exec_run(["sglang-ha", *args])
    return code, out.decode(errors="replace")


def test_status_and_history_parse_as_json_and_yaml(stack: Stack) -> None:
    primary = stack.wait_stable()
    code, out = ctl(stack, "status", "-o", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["leader"] == primary and doc["store_error"] is None
    assert {n["name"] for n in doc["nodes"]} == set(NODES)
    for node in doc["nodes"]:
        assert node["status"]["engine"]["state"] == "healthy", node
        assert node["status"]["role"] == ("primary" if node["name"] == primary else "standby")
    # The relay answered: each node's share of traffic is known, not null.
    assert doc["relay_errors"] == [] and all(n["traffic"] is not None for n in doc["nodes"])
    code, out = ctl(stack, "status", "--json")  # the old spelling still works
    assert code == 0 and json.loads(out)["leader"] == primary, out
    code, out = ctl(stack, "status", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["leader"] == primary, out
    # A bounded watch: two views, then it ends by itself.
    code, out = ctl(stack, "status", "--watch", "--count", "2", "--interval", "0.5")
    assert code == 0, out
    assert out.count(f"leader {primary}") == 2, out
    code, out = ctl(stack, "history", "-o", "json", "-n", "5")
    assert code == 0, out
    events = json.loads(out)
    assert len(events) == 5 and {"ts", "event", "node", "detail"} <= set(events[0])


def test_help_lists_one_line_per_command(stack: Stack) -> None:
    code, out = ctl(stack, "--help")
    assert code == 0, out
    commands = out.split("Commands:", 1)[1].strip().splitlines()
    names = [line.split()[0] for line in commands]
    for verb in ("status", "restart", "rolling-restart", "edit-config", "show-config", "remove"):
        assert verb in names, out
    assert len(names) == len(commands), "a command's help wrapped onto a second line"


def test_restart_of_the_primary_under_load_fails_no_request(stack: Stack) -> None:
    primary = stack.wait_stable()
    pid = stack._engine_pid(primary)
    with background_load(stack.gateway_url) as load:
        time.sleep(2)
        code, out = ctl(stack, "restart", primary)
        time.sleep(2)
    assert code == 0, out
    assert f"{primary} is the primary: planned switchover first" in out
    # Events are shown as they happen, not only the end result.
    assert "SWITCHOVER_COMPLETED" in out and "ENGINE_RESTART_REQUESTED" in out, out
    assert f"{primary}: engine healthy again" in out, out
    assert stack._engine_pid(primary) != pid, "the engine was not restarted"
    print(load.summary())  # the numbers behind "0 failed" (pytest -rP shows them)
    assert len(load.records) >= 20, "too little load to show anything: " + load.summary()
    assert not load.failed, load.summary()
    assert not load.mismatched, load.summary()
    assert stack.wait_stable() != primary


def test_rolling_restart_under_load_fails_no_request(stack: Stack) -> None:
    primary = stack.wait_stable()
    pids = {node: stack._engine_pid(node) for node in NODES}
    with background_load(stack.gateway_url) as load:
        time.sleep(2)
        code, out = ctl(stack, "rolling-restart")
        time.sleep(2)
    assert code == 0, out
    assert "rolling restart done" in out, out
    standby = next(n for n in NODES if n != primary)
    # Standbys first, the primary last (after a switchover).
    assert out.index(f"restarting the engine of {standby}") < out.index(
        f"restarting the engine of {primary}"
    ), out
    assert all(stack._engine_pid(node) != pid for node, pid in pids.items()), out
    print(load.summary())  # the numbers behind "0 failed" (pytest -rP shows them)
    assert len(load.records) >= 20, "too little load to show anything: " + load.summary()
    assert not load.failed, load.summary()
    assert not load.mismatched, load.summary()
    stack.wait_stable()


def test_edit_config_changes_failback_and_lease_timing_live(stack: Stack) -> None:
    primary = stack.wait_stable()
    # Refused with the rule it breaks, nothing stored.
    code, out = ctl(stack, "edit-config", "--set", "lease_ttl=1", "--force")
    assert code != 0, out
    assert "loop_wait + 2*retry_timeout <= lease_ttl" in out, out
    code, out = ctl(stack, "edit-config", "--set", "failback=sometimes", "--force")
    assert code != 0 and "failback" in out, out
    code, out = ctl(stack, "edit-config", "--set", "no_such_setting=1", "--force")
    assert code != 0 and "no_such_setting" in out, out
    code, out = ctl(stack, "show-config", "-o", "json")
    assert code == 0 and json.loads(out)["config"] == {}, out
    try:
        code, out = ctl(
            stack,
            "edit-config",
            "--set",
            "lease_ttl=4",
            "--set",
            "failback=preferred",
            "--set",
            "warm_rate=0.5",
            "--force",
        )
        assert code == 0, out
        for node in NODES:
            assert f"{node}: in effect" in out, out
        for node in NODES:
            status = stack.agent_status(node) or {}
            assert status.get("lease_ttl") == 4.0 and status.get("failback") == "preferred", status
        # The primary now renews for 4 s: more lease left than 2.5 s could ever give.
        wait_until(
            lambda: (stack.agent_status(primary) or {}).get("lease_time_left", 0) > 2.6,
            timeout=10,
            what="the primary to renew under the new lease_ttl",
        )
        for node, service in NODES.items():
            assert "dynamic config applied: lease_ttl 2.5 -> 4.0" in stack.logs(service), node
        wait_until(
            lambda: "warming rate 2 -> 0.5" in stack.logs("gateway"),
            timeout=10,
            what="the relay to apply the warming rate",
        )
        code, out = ctl(stack, "history", "-n", "20")
        assert (
            "CONFIG_CHANGED lease_ttl: - -> 4.0, failback: - -> preferred, warm_rate: - -> 0.5"
            in out
        ), out
        code, out = ctl(stack, "show-config")
        assert code == 0 and "lease_ttl: 4.0" in out and "# loop_wait: 0.5" in out, out
    finally:
        code, out = ctl(
            stack,
            "edit-config",
            "--set",
            "lease_ttl=",
            "--set",
            "failback=",
            "--set",
            "warm_rate=",
            "--force",
        )
    assert code == 0, out
    for node in NODES:
        assert (stack.agent_status(node) or {}).get("lease_ttl") == 2.5
    stack.wait_stable()


def test_remove_decommissions_a_stopped_standby(stack: Stack) -> None:
    primary = stack.wait_stable()
    standby = next(n for n in NODES if n != primary)
    code, out = ctl(stack, "remove", primary, "--force")
    assert code != 0 and "is the primary" in out, out
    code, out = ctl(stack, "remove", standby, "--force")
    assert code != 0 and "still runs" in out, out
    stack.kill_container(standby)
    try:
        wait_until(
            lambda: stack.agent_status(standby) is None, timeout=10, what="standby agent gone"
        )
        code, out = ctl(stack, "remove", standby, "--force", service=NODES[primary])
        assert code == 0, out
        assert f"removed {standby}" in out
        wait_until(
            lambda: (
                standby not in {n["name"] for n in (stack.relay_status() or {"nodes": []})["nodes"]}
            ),
            timeout=10,
            what="the relay to forget the removed node",
        )
        code, out = ctl(stack, "status", "-o", "json", service=NODES[primary])
        assert standby not in {n["name"] for n in json.loads(out)["nodes"]}, out
        code, out = ctl(stack, "history", "-n", "20", service=NODES[primary])
        assert f"NODE_REMOVED {standby} (by admin)" in out, out
    finally:
        stack.start_container(standby)
    # Started again, it registers itself and the relay finds it again.
    stack.wait_stable(timeout=120)
