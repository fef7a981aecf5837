"""A query of death with real simulator processes, agents, Redis and the relay.

Both engines crash on a marked prompt (the simulator's crash_marker knob). The relay
re-sends the request once, the second node dies too, and the request is quarantined:
a 503 that says why, the QUERY_QUARANTINED event and the metric. The restarted engine
(supervisord in the stack, the test here) serves everyone else, and the same request
never reaches an engine again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.cluster import LocalCluster, local_cluster
from tests.support.processes import RedisProcess

MARKER = "QOD-5d1e"


@pytest.fixture
async def cluster(redis_proc: RedisProcess) -> AsyncIterator[LocalCluster]:
    faults = {"SIM_FAULTS": json.dumps({"crash_marker": MARKER})}
    async with local_cluster(redis_proc, sim_env=faults) as c:
        await c.wait_ready()
        yield c


def restart_if_dead(cluster: LocalCluster, name: str) -> bool:
    """What supervisord does for a dead engine."""
    node = cluster.nodes[name]
    if node.sim is None or node.sim.proc is None or node.sim.proc.poll() is None:
        return False
    node._sim_cm.__exit__(None, None, None)
    node.sim = None
    cluster.start_engine(name)
    return True


async def test_a_query_of_death_is_quarantined_after_two_nodes(cluster: LocalCluster) -> None:
    assert cluster.relay is not None
    deadly = {"text": f"please {MARKER} now", "sampling_params": {"max_new_tokens": 4}}
    fine = {"text": "hello", "sampling_params": {"max_new_tokens": 4}}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{cluster.relay_url}/generate", json=deadly)
        assert r.status_code == 503, r.text
        assert "quarantined" in r.json()["error"]["message"]
        dead = [n for n in cluster.nodes if restart_if_dead(cluster, n)]
        assert sorted(dead) == sorted(cluster.nodes), "each node died once, holding it"
        log = cluster.ha_log("relay")
        assert log.count("QUERY_QUARANTINED") == 1, log
        assert cluster.relay.metrics.quarantined._value.get() == 1

        await cluster.wait_ready(timeout=30)
        # The same request again: refused at once, no engine touched.
        r = await asyncio.wait_for(http.post(f"{cluster.relay_url}/generate", json=deadly), 1)
        assert r.status_code == 503 and "quarantined" in r.json()["error"]["message"]
        # Everyone else is served.
        codes = await asyncio.gather(
            *(http.post(f"{cluster.relay_url}/generate", json=fine) for _ in range(10))
        )
        assert [c.status_code for c in codes] == [200] * 10
    assert not [n for n in cluster.nodes if restart_if_dead(cluster, n)], "no third crash"
