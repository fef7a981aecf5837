"""Pool mode end to end in one process: three simulator engines, their agents and the
relay, all with HA_MODE=pool, over a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ha_agent.config import HaMode
from tests.support.cluster import LocalCluster, collect_stream, local_cluster
from tests.support.processes import RedisProcess

NAMES = ("sglang-01", "sglang-02", "sglang-03")
BUDGET = 300  # tokens: long enough to be mid-stream when the engine dies
NODE = "X-SGLang-HA-Node"


@pytest.fixture
async def pool(redis_proc: RedisProcess) -> AsyncIterator[LocalCluster]:
    mode = {"mode": HaMode.POOL}
    async with local_cluster(
        redis_proc, names=NAMES, agent_settings=mode, relay_settings=mode
    ) as c:

        def all_serving() -> bool:
            assert c.relay is not None
            now = time.monotonic()
            return all(
                n.agent is not None and n.agent.ha.is_serving() for n in c.nodes.values()
            ) and all(v.can_serve(now) for v in c.relay.topology.nodes.values())

        await c.wait_for(all_serving, 20, "every node serving, as the relay sees it")
        yield c


def prompt(i: int) -> list[int]:
    return [(i * 7 + k) % 900 + 5 for k in range(80)]  # its JSON is past one affinity block


def stream_body(i: int) -> dict[str, Any]:
    sampling = {"max_new_tokens": BUDGET, "ignore_eos": True}
    return {"input_ids": prompt(i), "stream": True, "sampling_params": sampling}


def last_json(events: list[str]) -> dict[str, Any]:
    return json.loads(next(e for e in reversed(events) if e.startswith("{")))


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_all_three_nodes_serve_and_a_lost_engine_fails_no_stream(
    pool: LocalCluster, fault: str
) -> None:
    url = pool.relay_url + "/generate"
    async with httpx.AsyncClient(timeout=60) as client:
        # Every node takes a share of distinct conversations.
        served: Counter[str] = Counter()
        for i in range(30):
            body = {"input_ids": prompt(i), "sampling_params": {"max_new_tokens": 2}}
            r = await client.post(url, json=body)
            assert r.status_code == 200, r.text
            served[r.headers[NODE]] += 1
        assert set(served) == set(NAMES), served

        # Streams on every node; kill -9 (or SIGSTOP) one engine while they run.
        started: dict[int, str] = {}
        all_started = asyncio.Event()
        count = 12

        def on_event_for(i: int) -> Any:
            async def on_event(events: list[str], resp: httpx.Response) -> None:
                if len(events) == 3:
                    started[i] = resp.headers[NODE]
                    if len(started) == count:
                        all_started.set()

            return on_event

        streams = [
            asyncio.ensure_future(collect_stream(client, url, stream_body(i), on_event_for(i)))
            for i in range(count)
        ]
        await asyncio.wait_for(all_started.wait(), 30)
        victim = Counter(started.values()).most_common(1)[0][0]
        if fault == "kill":
            pool.kill_engine(victim)
        else:
            pool.freeze_engine(victim)
        try:
            results = await asyncio.gather(*streams)
            await check(pool, client, url, victim, started, results, count)
        finally:
            if fault == "freeze":
                pool.thaw_engine(victim)
        if fault == "kill":
            await rejoins(pool, client, url, victim)


async def check(
    pool: LocalCluster,
    client: httpx.AsyncClient,
    url: str,
    victim: str,
    started: dict[int, str],
    results: list[list[str]],
    count: int,
) -> None:
    """Every stream whole, the victim out of service, new requests on the survivors."""
    # Each stream whole, and token for token what an uninterrupted run gives.
    survivor = pool.nodes[next(n for n in NAMES if n != victim)].engine_url + "/generate"
    wanted = await asyncio.gather(
        *(collect_stream(client, survivor, stream_body(i)) for i in range(count))
    )
    for i, (events, want) in enumerate(zip(results, wanted, strict=True)):
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        got = last_json(events)
        assert got["meta_info"]["completion_tokens"] == BUDGET, f"stream {i}"
        assert got["output_ids"] == last_json(want)["output_ids"], f"stream {i}"
    moved = [i for i, node in started.items() if node == victim]
    assert moved, "the victim held streams"
    assert pool.ha_log("relay").count("STREAM_MIGRATED") >= len(moved)

    # The lost node is out of service; new requests go to the survivors only.
    agent = pool.nodes[victim].agent
    assert agent is not None
    await pool.wait_for(lambda: not agent.ha.is_serving(), 10, f"{victim} out of service")
    assert f"NODE_OUT_OF_SERVICE {victim}" in pool.ha_log(victim)
    for i in range(100, 112):
        body = {"input_ids": prompt(i), "sampling_params": {"max_new_tokens": 2}}
        r = await client.post(url, json=body)
        assert r.status_code == 200 and r.headers[NODE] != victim


async def rejoins(pool: LocalCluster, client: httpx.AsyncClient, url: str, victim: str) -> None:
    """The engine back (supervisord would restart it): the node rejoins after
    HA_POOL_REJOIN_STABLE, not before, and takes new requests again."""
    pool.start_engine(victim)
    agent = pool.nodes[victim].agent
    assert agent is not None
    await pool.wait_for(lambda: agent.ha.engine_health.healthy, 20, f"{victim}'s engine healthy")
    healthy_at = time.monotonic()
    await pool.wait_for(agent.ha.is_serving, 20, f"{victim} back in service")
    assert time.monotonic() - healthy_at >= agent.ha.s.pool_rejoin_stable - 0.5
    assert f"NODE_REJOINED {victim}" in pool.ha_log(victim)
    assert pool.relay is not None
    view = pool.relay.topology.nodes[victim]
    await pool.wait_for(
        lambda: view.can_serve(time.monotonic()), 5, f"the relay routes to {victim}"
    )
    served: Counter[str] = Counter()
    for i in range(200, 230):
        body = {"input_ids": prompt(i), "sampling_params": {"max_new_tokens": 2}}
        r = await client.post(url, json=body)
        assert r.status_code == 200
        served[r.headers[NODE]] += 1
    assert served[victim] > 0, served
