"""Pool mode on the agent, cycle by cycle on a fake clock: every healthy node serves,
an unhealthy one is out at once, a recovered one rejoins only after damping, and the
store's outage changes nothing about serving."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.auth import TokenAuth
from ha_agent.config import HaMode
from ha_agent.dcs.base import AgentStatus, Role
from ha_agent.node.api import AgentApi
from ha_agent.node.engine.monitor import EngineState
from ha_agent.node.metrics import AgentMetrics
from tests.support.fakes import FakeClock, FakeStore
from tests.unit.test_ha import Node, make_node

STABLE = 5.0  # HA_POOL_REJOIN_STABLE's default


def pool_node(name: str, store: FakeStore, clock: FakeClock) -> Node:
    return make_node(name, store, clock, "sglang-02", mode=HaMode.POOL, pool_rejoin_stable=STABLE)


@pytest.fixture
def nodes(store: FakeStore, clock: FakeClock) -> list[Node]:
    return [pool_node(f"sglang-0{i}", store, clock) for i in (1, 2, 3)]


async def cycle_all(nodes: list[Node]) -> list[str]:
    return [await n.ha.run_cycle() for n in nodes]


def registered_serving(store: FakeStore) -> dict[str, bool]:
    return {name: m.serving for name, (m, _) in store.members.items()}


async def test_every_healthy_node_serves_and_one_of_them_coordinates(
    nodes: list[Node], store: FakeStore
) -> None:
    said = await cycle_all(nodes)
    assert (
        said[0] == "serving: joined the pool; promoted to primary (epoch 1): no leader was present"
    )
    assert said[1].startswith("serving: joined the pool; following sglang-01")
    assert all(n.ha.is_serving() for n in nodes)
    assert [n.ha.is_primary() for n in nodes] == [True, False, False], "/primary keeps its meaning"
    assert registered_serving(store) == {"sglang-01": True, "sglang-02": True, "sglang-03": True}
    assert "NODE_SERVING sglang-02: engine healthy" in nodes[1].emitted()
    status = nodes[1].ha.status()
    assert status.mode == "pool" and status.serving
    assert AgentStatus.from_json(status.to_json()) == status


async def test_unhealthy_node_is_out_at_once_and_others_keep_serving(nodes: list[Node]) -> None:
    await cycle_all(nodes)
    nodes[1].engine.set(EngineState.HUNG, "canary timed out")
    # No cycle needed: the relay polling /ha/status sees it at the next poll.
    assert not nodes[1].ha.is_serving()
    assert not nodes[1].ha.status().serving
    assert "NODE_OUT_OF_SERVICE sglang-02: engine hung: canary timed out" in nodes[1].emitted()
    said = await nodes[1].ha.run_cycle()
    assert said.startswith("out of service: engine hung (canary timed out)")
    assert nodes[0].ha.is_serving() and nodes[2].ha.is_serving()


async def test_coordinator_with_a_sick_engine_stops_serving_and_hands_on_the_lease(
    nodes: list[Node], store: FakeStore
) -> None:
    await cycle_all(nodes)
    nodes[0].engine.set(EngineState.DEAD, "connection refused")
    assert not nodes[0].ha.is_serving()
    assert (await nodes[0].ha.run_cycle()).startswith("out of service: engine dead")
    assert store.leader is None
    assert "promoted to primary (epoch 2)" in await nodes[1].ha.run_cycle()
    assert nodes[1].ha.is_serving() and nodes[2].ha.is_serving()


async def test_recovered_node_rejoins_only_once_stable(nodes: list[Node], clock: FakeClock) -> None:
    await cycle_all(nodes)
    n = nodes[2]
    n.engine.set(EngineState.DEAD, "killed")
    clock.advance(3)
    n.engine.set(EngineState.HEALTHY, "canary answered")
    clock.advance(STABLE - 0.5)
    said = await n.ha.run_cycle()
    assert said.startswith("out of service; rejoining in 0.5s if the engine stays healthy")
    assert not n.ha.is_serving()
    clock.advance(0.5)
    assert (await n.ha.run_cycle()).startswith("serving: rejoined the pool")
    assert n.ha.is_serving()
    assert "NODE_REJOINED sglang-03: engine healthy and stable" in n.emitted()


async def test_flapping_node_is_held_back_longer_each_time(
    nodes: list[Node], clock: FakeClock
) -> None:
    await cycle_all(nodes)
    n = nodes[2]
    joined: list[float] = []
    for _ in range(3):  # fail, recover, fail... : each failure inside the window counts
        n.engine.set(EngineState.HUNG, "stall")
        failed_at = clock()
        clock.advance(1)
        n.engine.set(EngineState.HEALTHY, "ok")
        while not n.ha.is_serving():
            await n.ha.run_cycle()
            clock.advance(0.5)
            assert clock() - failed_at < 60, "a recovered node must rejoin eventually"
        joined.append(clock() - failed_at)
    # The first failure is free (stable period only); then 10 s, then 20 s of damping
    # from the failure on.
    assert joined[0] == pytest.approx(1 + STABLE, abs=0.6)
    assert joined[1] >= 10 and joined[2] >= 20
    out = [line for line in n.emitted() if line.startswith("NODE_OUT_OF_SERVICE")]
    rejoined = [line for line in n.emitted() if line.startswith("NODE_REJOINED")]
    assert len(out) == 3 and len(rejoined) == 3, "one event per change, no flapping lines"


async def test_store_outage_keeps_every_healthy_node_serving(
    nodes: list[Node], store: FakeStore, clock: FakeClock
) -> None:
    await cycle_all(nodes)
    store.down = True
    for _ in range(20):
        said = await cycle_all(nodes)
        clock.advance(0.5)
    assert all(s.startswith("serving; ") for s in said), said
    assert all(n.ha.is_serving() for n in nodes)
    # A node that fails meanwhile still goes out, and comes back, without the store.
    nodes[1].engine.set(EngineState.HUNG, "stall")
    assert not nodes[1].ha.is_serving()
    nodes[1].engine.set(EngineState.HEALTHY, "ok")
    clock.advance(STABLE)
    assert (await nodes[1].ha.run_cycle()).startswith("serving: rejoined the pool")


async def test_pair_mode_serving_is_the_primary(store: FakeStore, clock: FakeClock) -> None:
    a = make_node("sglang-01", store, clock, "sglang-02")
    b = make_node("sglang-02", store, clock, "sglang-01")
    for _ in range(2):  # the registry learns the new role at the next cycle
        await a.ha.run_cycle()
        await b.ha.run_cycle()
    assert a.ha.is_serving() and not b.ha.is_serving()
    assert registered_serving(store) == {"sglang-01": True, "sglang-02": False}
    assert a.ha.status().mode == "pair" and a.ha.status().role is Role.PRIMARY


async def test_serving_probe_answers_200_only_in_service(nodes: list[Node]) -> None:
    await cycle_all(nodes)
    n = nodes[1]
    metrics = AgentMetrics()
    api = AgentApi(n.ha, metrics, TokenAuth(None, metrics.auth_rejected))
    async with TestClient(TestServer(api.app())) as client:
        assert (await client.get("/serving")).status == 200
        assert (await client.get("/primary")).status == 503, "not the coordinator"
        n.engine.set(EngineState.HUNG, "stall")
        resp = await client.get("/serving")
        assert resp.status == 503
        assert "engine hung" in (await resp.json())["detail"]
