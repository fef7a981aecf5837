"""Redis and Sentinel outages: serving goes on, roles stay, coordination comes back.

During an outage both agents and the relay enter DEGRADED mode (logged, and
visible in /ha/status, /relay/status and the metrics); the primary stays primary
because its peer acknowledges it (Patroni's failsafe mode); nobody is promoted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.background_load import background_load
from tests.support.processes import wait_until
from tests.support.stack import NODES, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE = 10.0  # seconds the store stays away, several lease TTLs


def roles_and_epoch(stack: Stack) -> tuple[dict[str, str], int]:
    statuses = {n: stack.agent_status(n) for n in NODES}
    assert all(statuses.values()), statuses
    roles = {n: s["role"] for n, s in statuses.items() if s}
    epochs = {s["epoch"] for s in statuses.values() if s}
    assert len(epochs) == 1, statuses
    return roles, epochs.pop()


def all_degraded(stack: Stack, value: bool) -> Callable[[], bool]:
    def check() -> bool:
        statuses = [stack.agent_status(n) for n in NODES]
        relay = stack.relay_status()
        return bool(
            relay
            and relay["degraded"] is value
            and all(s and s["degraded"] is value for s in statuses)
        )

    return check


def agent_metric(stack: Stack, node: str, name: str) -> float:
    text = httpx.get(f"{stack.agent_url(node)}/metrics", timeout=5).text
    line = next(line for line in text.splitlines() if line.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def outage(stack: Stack, services: list[str]) -> None:
    """Take `services` away under load; check nothing fails and nothing moves."""
    stack.wait_stable()
    before_roles, before_epoch = roles_and_epoch(stack)
    with background_load(stack.gateway_url) as load:
        time.sleep(2)
        for service in services:
            stack.container(service).stop(timeout=5)
        try:
            wait_until(
                all_degraded(stack, True),
                timeout=20,
                interval=0.2,
                what="agents and relay in degraded mode",
            )
            primary = stack.primary()
            assert primary is not None
            assert agent_metric(stack, primary, "sglang_ha_degraded") == 1.0
            deadline = time.monotonic() + OUTAGE
            while time.monotonic() < deadline:  # roles hold for the whole outage
                roles, _ = roles_and_epoch(stack)
                assert roles == before_roles, roles
                time.sleep(0.5)
        finally:
            for service in services:
                stack.container(service).start()
        wait_until(
            all_degraded(stack, False), timeout=60, interval=0.5, what="coordination to resume"
        )
        time.sleep(2)
    assert not load.failed, load.summary()
    assert not load.mismatched, load.summary()
    assert len(load.records) > 50, load.summary()
    after_roles, after_epoch = roles_and_epoch(stack)
    assert after_roles == before_roles
    assert after_epoch == before_epoch, "no role change: the epoch did not move"
    for service in ("node-1", "node-2", "gateway"):
        log = stack.ha_log(service)
        assert "DEGRADED_MODE_ENTERED" in log and "DEGRADED_MODE_EXITED" in log, service
    stack.wait_stable()


def test_redis_master_and_replica_down(stack: Stack) -> None:
    outage(stack, ["redis-1", "redis-2"])


def test_all_sentinels_down(stack: Stack) -> None:
    outage(stack, ["sentinel-1", "sentinel-2", "sentinel-3"])


def test_sentinel_promotes_a_new_master_under_load_without_a_role_change(stack: Stack) -> None:
    stack.wait_stable()
    before_roles, before_epoch = roles_and_epoch(stack)

    def master() -> str:
        code, out = stack.container("sentinel-1").exec_run(
            [
                "sh",
                "-c",
                'REDISCLI_AUTH="$(cat /run/secrets/ha_sentinel_password)" redis-cli -p 26379 '
                "sentinel get-master-addr-by-name sglang-ha",
            ]
        )
        return out.decode().split()[0] if code == 0 and out.strip() else ""

    old = master()
    victim = "redis-1" if old.startswith("redis-1") else "redis-2"
    with background_load(stack.gateway_url) as load:
        time.sleep(2)
        stack.container(victim).pause()
        try:
            wait_until(
                lambda: master() and not master().startswith(victim),
                timeout=60,
                interval=0.5,
                what="Sentinel to promote the replica",
            )
            wait_until(
                all_degraded(stack, False),
                timeout=30,
                interval=0.5,
                what="agents and relay back on the new master",
            )
            time.sleep(3)
        finally:
            stack.container(victim).unpause()
    assert not load.failed, load.summary()
    assert not load.mismatched, load.summary()
    after_roles, after_epoch = roles_and_epoch(stack)
    assert after_roles == before_roles
    assert after_epoch == before_epoch
    stack.wait_stable()
