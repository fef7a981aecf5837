"""A pool of three simulator nodes, brought up as `make up MODE=pool NODES=3` does
(scripts/stack-nodes.sh): every node serves, and an engine killed or frozen under load
fails no request -- its streams continue on a survivor, every answer identical to an
uninterrupted run. `make failover-test MODE=pool NODES=3` runs every fault."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.failover.load import Load
from tests.failover.runner import (
    ScenarioResult,
    assert_clean_failover,
    run_scenario,
    trial_with_one_retry,
)
from tests.failover.scenarios import FAULTS
from tests.support.stack import Stack, require_host_tools, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 3


@pytest.fixture(scope="module")
def pool() -> Iterator[Stack]:
    require_host_tools()
    with running_stack(("compose.yaml", "compose.test.yaml"), mode="pool", nodes=NODES) as s:
        yield s
        bugs = s.bug_lines()
        if bugs:
            pytest.fail("components logged BUG lines:\n" + "\n".join(bugs[:20]))


def test_every_node_of_the_pool_serves(pool: Stack) -> None:
    pool.wait_stable(90.0)
    relay = pool.relay_status() or {}
    assert relay.get("mode") == "pool", relay
    routed = sorted(n["name"] for n in relay.get("nodes", []) if n["can_serve"])
    assert len(routed) == NODES, relay
    # Distinct conversations spread over every node (prefix affinity keeps each one home).
    served: Counter[str] = Counter()
    with httpx.Client(timeout=60) as client:
        for i in range(30):
            r = client.post(
                pool.gateway_url + "/v1/chat/completions",
                json={
                    "model": "default",
                    "messages": [{"role": "user", "content": f"conversation {i}: " + "x" * 300}],
                    "max_tokens": 4,
                },
            )
            assert r.status_code == 200, r.text
            served[r.headers["X-SGLang-HA-Node"]] += 1
    assert len(served) == NODES, served


@pytest.mark.parametrize("fault_name", ["engine-kill", "engine-sigstop"])
def test_a_pool_node_lost_under_load_fails_no_request(pool: Stack, fault_name: str) -> None:
    async def scenario(trial: int) -> ScenarioResult:
        load = Load(pool.gateway_url, concurrency=8)
        try:
            await load.take_references()
            return await run_scenario(pool, FAULTS[fault_name], trial=trial, load=load)
        finally:
            await load.close()

    result = trial_with_one_retry(lambda trial: asyncio.run(scenario(trial)))
    summary = assert_clean_failover(result)
    assert result.mode == "pool", summary
    log = "".join(pool.ha_log(n) for n in pool.services.values())
    assert f"NODE_OUT_OF_SERVICE {result.primary_before}" in log, summary
