"""Operating the cluster: the `sglang-ha` CLI, planned switchover, pause/resume,
history and a flapping NIC — all under load, none failing a request. The other verbs
(restart, rolling-restart, edit-config...) are in test_cli.py."""

from __future__ import annotations

import time

import pytest

from tests.support.background_load import background_load
from tests.support.processes import wait_until
from tests.support.stack import NODES, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = {name: service for name, service in NODES.items()}


def ctl(stack: Stack, *args: str, service: str = "node-1") -> tuple[int, str]:
    code, out = stack.container(service).exec_run(["sglang-ha", *args])
    return code, out.decode(errors="replace")


def test_status_lists_both_nodes_with_roles(stack: Stack) -> None:
    primary = stack.wait_stable()
    code, out = ctl(stack, "status")
    assert code == 0, out
    assert "leader " + primary in out
    for name in NODES:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert ("primary" if name == primary else "standby") in line
        assert "healthy" in line


def test_switchover_under_load_fails_no_request(stack: Stack) -> None:
    primary = stack.wait_stable()
    target = next(n for n in NODES if n != primary)
    with background_load(stack.gateway_url) as load:
        time.sleep(2)
        code, out = ctl(stack, "switchover", "--to", target)
        assert code == 0, out
        assert f"switched over from {primary} to {target}" in out
        time.sleep(3)
    assert not load.failed, load.summary()
    assert not load.mismatched, load.summary()
    assert stack.wait_stable() == target
    code, out = ctl(stack, "history", "-n", "30")
    assert f"SWITCHOVER_COMPLETED from {primary} to {target}" in out
    assert "FAILOVER_INITIATED" not in out.split(f"SWITCHOVER_REQUESTED from {primary}")[-1]


def test_switchover_to_an_unhealthy_node_is_refused(stack: Stack) -> None:
    primary = stack.wait_stable()
    standby = next(n for n in NODES if n != primary)
    stack.sim_faults(standby, fail_health=True, error_rate=1.0)
    try:
        wait_until(
            lambda: (stack.agent_status(standby) or {}).get("engine", {}).get("state") != "healthy",
            timeout=20,
            what="standby to be judged unhealthy",
        )
        code, out = ctl(stack, "switchover", "--to", standby)
        assert code != 0
        assert "not healthy" in out
        assert stack.primary() == primary
    finally:
        stack.sim_faults(standby)
    stack.wait_stable()


def test_pause_keeps_roles_and_resume_acts_again(stack: Stack) -> None:
    primary = stack.wait_stable()
    standby = next(n for n in NODES if n != primary)
    epoch = (stack.agent_status(primary) or {})["epoch"]
    code, out = ctl(stack, "pause")
    assert code == 0, out
    try:
        with background_load(stack.gateway_url) as load:
            time.sleep(1)
            stack.sim_faults(primary, hang=True)
            wait_until(
                lambda: (
                    (stack.agent_status(primary) or {}).get("engine", {}).get("state") == "hung"
                ),
                timeout=20,
                what="primary engine judged hung",
            )
            time.sleep(3)
            status = stack.agent_status(primary) or {}
            # Paused: the lease stays where it is (no automatic failover), though the
            # sick engine's /primary answers 503 so no balancer sends it traffic.
            assert status.get("leader") == primary and status.get("epoch") == epoch, status
            assert status.get("paused") is True
            assert status.get("role") != "primary"
        # The relay still routed around the sick engine meanwhile.
        assert not load.failed, load.summary()
        code, out = ctl(stack, "resume")
        assert code == 0, out
        wait_until(lambda: stack.primary() == standby, timeout=20, what="failover after resume")
    finally:
        ctl(stack, "resume")
        stack.sim_faults(primary)
    stack.wait_stable()


def test_flapping_nic_causes_at_most_one_role_change(stack: Stack) -> None:
    primary = stack.wait_stable()
    before = {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES}
    with background_load(stack.gateway_url) as load:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:  # 1 s down / 1 s up for 60 s
                stack.nic(primary, "down")
                time.sleep(1)
                stack.nic(primary, "up")
                time.sleep(1)
        finally:
            stack.nic(primary, "up")
        time.sleep(3)
    assert not load.failed, load.summary()
    new_primary = stack.wait_stable()
    epoch_after = (stack.agent_status(new_primary) or {}).get("epoch")
    changes = int(epoch_after or 0) - int(before[primary] or 0)
    assert changes <= 1, f"{changes} role changes during 60 s of NIC flapping"
