"""The HA state machine, cycle by cycle, on a fake clock (after Patroni's test_ha.py).

Each cycle returns the sentence the agent logs; the tests assert those sentences
and what the store and /primary say.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ha_agent import events as ev
from ha_agent.config import AgentSettings
from ha_agent.dcs.base import Member, Role, Switchover
from ha_agent.events import EventLog
from ha_agent.node.engine.monitor import EngineState
from ha_agent.node.ha import Ha
from tests.support.fakes import FakeClock, FakeEngine, FakePeers, FakeStore, agent_status

TTL, MARGIN = 2.5, 0.5


@dataclass
class Node:
    ha: Ha
    engine: FakeEngine
    peers: FakePeers
    events: EventLog

    def emitted(self) -> list[str]:
        return [f"{e.event} {e.detail}".strip() for e in self.events.recent]


def make_node(name: str, store: FakeStore, clock: FakeClock, peer: str, **extra: object) -> Node:
    settings = AgentSettings(
        node_name=name,
        advertise_engine_url=f"http://{name}:30000",
        advertise_api_url=f"http://{name}:8008",
        peers=[f"http://{peer}:8008"],
        lease_ttl=TTL,
        loop_wait=0.5,
        retry_timeout=0.75,
        safety_margin=MARGIN,
        redis_url="redis://unused",
        **extra,  # type: ignore[arg-type]
    )
    engine = FakeEngine(clock)
    peers = FakePeers()
    events = EventLog(None, name)
    ha = Ha(settings, store, engine, events, peers, clock=clock)  # type: ignore[arg-type]
    return Node(ha, engine, peers, events)


@pytest.fixture
def a(store: FakeStore, clock: FakeClock) -> Node:
    return make_node("sglang-01", store, clock, "sglang-02")


@pytest.fixture
def b(store: FakeStore, clock: FakeClock) -> Node:
    return make_node("sglang-02", store, clock, "sglang-01")


async def test_healthy_node_takes_a_free_lease(a: Node, store: FakeStore) -> None:
    assert await a.ha.run_cycle() == "promoted to primary (epoch 1): no leader was present"
    assert a.ha.is_primary()
    assert store.leader == (1, "sglang-01")
    assert "LEASE_ACQUIRED sglang-01 epoch 1" in a.emitted()
    assert await a.ha.run_cycle() == "renewed lease as primary (epoch 1)"


async def test_standby_follows_and_never_answers_primary(a: Node, b: Node) -> None:
    await a.ha.run_cycle()
    assert await b.ha.run_cycle() == "following sglang-01 (epoch 1) as standby; engine healthy"
    assert not b.ha.is_primary()
    assert b.ha.is_standby()


async def test_unhealthy_engine_never_takes_the_lease(a: Node, store: FakeStore) -> None:
    a.engine.set(EngineState.DEAD, "connection refused")
    assert await a.ha.run_cycle() == "no leader; not eligible: engine dead (connection refused)"
    assert store.leader is None


async def test_unhealthy_primary_releases_its_lease_and_standby_takes_over(
    a: Node, b: Node, store: FakeStore
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    a.engine.set(EngineState.HUNG, "canary timed out after 2s")
    assert not a.ha.is_primary(), "/primary must turn 503 at once"
    assert await a.ha.run_cycle() == (
        "demoted: engine hung (canary timed out after 2s); released the lease"
    )
    assert store.leader is None
    assert await b.ha.run_cycle() == "promoted to primary (epoch 2): failover from sglang-01"
    assert "FAILOVER_INITIATED from sglang-01 to sglang-02" in b.emitted()
    # The recovered node rejoins as standby and does not grab the lease back.
    a.engine.set(EngineState.HEALTHY)
    assert await a.ha.run_cycle() == "following sglang-02 (epoch 2) as standby; engine healthy"


async def test_dead_primary_lease_expires_and_standby_takes_over(
    a: Node, b: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    # The primary's host dies: nobody renews. The standby waits out the TTL.
    clock.advance(TTL - 0.1)
    assert (await b.ha.run_cycle()).startswith("following sglang-01")
    clock.advance(0.2)
    assert await b.ha.run_cycle() == "promoted to primary (epoch 2): failover from sglang-01"


async def test_primary_fences_itself_before_the_store_lease_expires(
    a: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    store.down = True
    clock.advance(TTL - MARGIN)
    # No cycle has run (a frozen agent waking up): /primary is already 503 ...
    assert not a.ha.is_primary()
    # ... while the store still holds the lease for MARGIN more seconds.
    assert store.leader is not None and store.expires - clock() == pytest.approx(MARGIN)
    message = await a.ha.run_cycle()
    assert message.startswith("fenced (lease not renewed in time")
    assert any(e.startswith(ev.FENCED) for e in a.emitted())


async def test_store_outage_primary_stays_while_peer_acknowledges(
    a: Node, b: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    await a.ha.run_cycle()  # learns its peer from the registry
    store.down = True
    a.peers.acks["http://sglang-02:8008"] = True
    for _ in range(10):  # 5 s, twice the TTL
        clock.advance(0.5)
        message = await a.ha.run_cycle()
        assert message == (
            "store unreachable: staying primary (epoch 1), 1 peer(s) acknowledged (failsafe)"
        )
        assert a.ha.is_primary()
    assert "DEGRADED_MODE_ENTERED coordination store unreachable: store down" in a.emitted()
    assert (await b.ha.run_cycle()) == (
        "store unreachable: staying standby, no promotion without the store"
    )
    store.down = False
    assert await a.ha.run_cycle() == "renewed lease as primary (epoch 1)"
    assert "DEGRADED_MODE_EXITED coordination store reachable again" in a.emitted()


async def test_store_outage_without_acknowledgement_fences(
    a: Node, b: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    await a.ha.run_cycle()
    store.down = True
    a.peers.acks["http://sglang-02:8008"] = False
    clock.advance(0.5)
    assert (await a.ha.run_cycle()).startswith(
        "store unreachable and 1 peer(s) did not acknowledge"
    )
    clock.advance(TTL)
    assert not a.ha.is_primary()
    assert (await a.ha.run_cycle()).startswith("fenced (")


async def test_standby_waits_while_previous_primary_says_it_holds_a_valid_lease(
    a: Node, b: Node, store: FakeStore
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    store.leader = None  # the key was lost in a Redis failover
    b.peers.statuses["http://sglang-01:8008"] = agent_status(
        "sglang-01", Role.PRIMARY, lease_time_left=1.5
    )
    assert await b.ha.run_cycle() == (
        "no leader key, but sglang-01 says it is primary with a valid lease: waiting"
    )
    # The primary puts the key back under its own epoch at its next renewal.
    assert await a.ha.run_cycle() == "renewed lease as primary (epoch 1)"
    assert store.leader == (1, "sglang-01")


async def test_paused_cluster_keeps_roles(a: Node, b: Node, store: FakeStore) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    store.paused = True
    a.engine.set(EngineState.HUNG, "maintenance")
    assert await a.ha.run_cycle() == "renewed lease as primary (epoch 1) (paused)"
    store.leader = None
    assert await b.ha.run_cycle() == (
        "no leader, but automatic actions are paused: not taking the lease"
    )


async def test_planned_switchover_hands_the_lease_to_the_target(
    a: Node, b: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    a.peers.statuses["http://sglang-02:8008"] = agent_status("sglang-02")
    store.switchover = Switchover("sglang-01", "sglang-02", clock())
    assert await a.ha.run_cycle() == "demoted: planned switchover to sglang-02; released the lease"
    # The old primary does not race the target for the free lease.
    assert (await a.ha.run_cycle()).startswith("no leader; planned switchover to sglang-02")
    assert await b.ha.run_cycle() == (
        "promoted to primary (epoch 2) by planned switchover from sglang-01"
    )
    assert store.switchover is None
    assert not any(e.startswith(ev.FAILOVER_INITIATED) for e in b.emitted())


async def test_switchover_waits_for_a_healthy_target(
    a: Node, b: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    a.peers.statuses["http://sglang-02:8008"] = agent_status(
        "sglang-02", engine=EngineState.STARTING
    )
    store.switchover = Switchover("sglang-01", "sglang-02", clock())
    assert await a.ha.run_cycle() == (
        "renewed lease as primary (epoch 1); switchover pending: no healthy target yet"
    )


async def test_flapping_node_is_held_back_while_another_can_lead(
    a: Node, store: FakeStore, clock: FakeClock
) -> None:
    await store.register(
        Member("sglang-02", "http://b:30000", "http://b:8008", engine_health="healthy"), ttl=600
    )
    for _ in range(3):  # three failures in a row: hold-back 10 s, then 20 s
        a.engine.set(EngineState.DEAD, "crash")
        a.engine.set(EngineState.HEALTHY)
    assert await a.ha.run_cycle() == (
        "no leader; held back 20.0s more: engine health has been flapping"
    )
    clock.advance(20.1)
    assert await a.ha.run_cycle() == "promoted to primary (epoch 1): no leader was present"


async def test_flapping_node_still_leads_when_no_other_node_can(a: Node) -> None:
    for _ in range(3):
        a.engine.set(EngineState.DEAD, "crash")
        a.engine.set(EngineState.HEALTHY)
    assert await a.ha.run_cycle() == "promoted to primary (epoch 1): no leader was present"


async def test_restarted_agent_resumes_its_own_lease(
    a: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    restarted = make_node("sglang-01", store, clock, "sglang-02")
    assert not restarted.ha.is_primary()
    assert await restarted.ha.run_cycle() == (
        "resumed as primary under our existing lease (epoch 1)"
    )
    assert restarted.ha.is_primary()


async def test_failsafe_ack_refused_by_a_primary_or_for_an_old_epoch(a: Node, b: Node) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    assert not a.ha.acknowledge_failsafe("sglang-02", 1), "a primary never acks another"
    assert not b.ha.acknowledge_failsafe("sglang-01", 0), "older epoch than seen"
    assert b.ha.acknowledge_failsafe("sglang-01", 1)


# -- failback ---------------------------------------------------------------------------


def failback_pair(
    store: FakeStore, clock: FakeClock, policy: str, **extra: object
) -> tuple[Node, Node]:
    nodes = []
    for name, peer, priority in (("sglang-01", "sglang-02", 10), ("sglang-02", "sglang-01", 0)):
        node = make_node(name, store, clock, peer)
        node.ha.s.failback = policy  # type: ignore[assignment]
        node.ha.s.priority = priority
        for key, value in extra.items():
            setattr(node.ha.s, key, value)
        nodes.append(node)
    a, b = nodes
    a.peers.agents["http://sglang-02:8008"] = b.ha
    b.peers.agents["http://sglang-01:8008"] = a.ha
    return a, b


async def fail_over_from_a(a: Node, b: Node, clock: FakeClock) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    await a.ha.run_cycle()
    a.engine.set(EngineState.DEAD, "crash")
    await a.ha.run_cycle()
    assert (await b.ha.run_cycle()).startswith("promoted to primary (epoch 2)")
    clock.advance(1)
    a.engine.set(EngineState.HEALTHY)


async def test_never_failback_keeps_the_new_primary(store: FakeStore, clock: FakeClock) -> None:
    a, b = failback_pair(store, clock, "never")
    await fail_over_from_a(a, b, clock)
    for _ in range(200):
        clock.advance(0.5)
        assert (await a.ha.run_cycle()).startswith("following sglang-02")
        await b.ha.run_cycle()
    assert store.leader == (2, "sglang-02")


async def tick(clock: FakeClock, seconds: float, *nodes: Node) -> list[str]:
    """Let time pass in loop_wait steps, every node cycling; the last sentences."""
    last: list[str] = []
    for _ in range(round(seconds / 0.5)):
        clock.advance(0.5)
        last = [await n.ha.run_cycle() for n in nodes]
    return last


async def test_negotiated_failback_is_refused_while_the_primary_is_fine(
    store: FakeStore, clock: FakeClock
) -> None:
    a, b = failback_pair(store, clock, "negotiated", failback_settle=15.0)
    await fail_over_from_a(a, b, clock)
    sentences = await tick(clock, 10, b, a)
    assert sentences[1] == "following sglang-02 (epoch 2) as standby; engine healthy"
    await tick(clock, 5, b, a)
    assert "FAILBACK_REFUSED sglang-02 to sglang-01: the primary is not degraded" in a.emitted()
    # It does not ask again soon, and nothing moved.
    await tick(clock, 20, b, a)
    assert sum(e.startswith("FAILBACK_REFUSED") for e in a.emitted()) == 1
    assert store.leader == (2, "sglang-02")


async def test_negotiated_failback_when_the_primary_is_degraded(
    store: FakeStore, clock: FakeClock
) -> None:
    a, b = failback_pair(store, clock, "negotiated", failback_settle=15.0, failback_grace=30.0)
    await fail_over_from_a(a, b, clock)
    b.engine.set(EngineState.HEALTHY, "busy", queued=50.0)
    await tick(clock, 15, b, a)
    granted = [e for e in a.emitted() if e.startswith("FAILBACK_GRANTED")]
    assert granted == [
        "FAILBACK_GRANTED sglang-02 to sglang-01: planned switchover to sglang-01 in 30s"
        " (queue 50 >= 32)"
    ]
    b.peers.statuses["http://sglang-01:8008"] = agent_status("sglang-01")
    # The grace period: b stays primary for 30 s, then hands over as planned.
    await tick(clock, 29, b, a)
    assert store.leader == (2, "sglang-02")
    await tick(clock, 2, b, a)
    assert store.leader == (3, "sglang-01")
    assert "SWITCHOVER_COMPLETED from sglang-02 to sglang-01" in a.emitted()
    assert not [e for e in a.emitted() if e.startswith("FAILOVER_INITIATED from sglang-02")]


async def test_preferred_failback_after_a_stable_period(store: FakeStore, clock: FakeClock) -> None:
    a, b = failback_pair(store, clock, "preferred", failback_stable=60.0)
    await fail_over_from_a(a, b, clock)
    b.peers.statuses["http://sglang-01:8008"] = agent_status("sglang-01", for_seconds=30)
    await tick(clock, 20, b, a)
    assert store.leader == (2, "sglang-02")
    b.peers.statuses["http://sglang-01:8008"] = agent_status("sglang-01", for_seconds=61)
    await tick(clock, 10, b, a)
    assert store.leader == (3, "sglang-01")
    assert any("failback to the preferred node" in e for e in b.emitted())


# -- the file-lock arbiter (single host, Redis away) --------------------------------------


async def test_arbiter_lets_nodes_fail_over_while_redis_is_away(
    store: FakeStore, clock: FakeClock, tmp_path: Path
) -> None:
    lock = str(tmp_path / "arbiter.lock")
    a = make_node("sglang-01", store, clock, "sglang-02", arbiter_file=lock)
    b = make_node("sglang-02", store, clock, "sglang-01", arbiter_file=lock)
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    assert a.ha.arbiter is not None and a.ha.arbiter.held, "the primary holds the lock"
    store.down = True
    clock.advance(0.5)
    assert (await a.ha.run_cycle()) == (
        "store unreachable: staying primary (epoch 1), holding the arbiter lock"
    )
    assert (await b.ha.run_cycle()) == (
        "store unreachable: staying standby; the primary holds the arbiter lock"
    )
    # The primary's engine dies while Redis is still away: it steps down ...
    a.engine.set(EngineState.DEAD, "crash")
    clock.advance(0.5)
    assert (await a.ha.run_cycle()) == (
        "store unreachable: stepped down and released the arbiter lock"
    )
    # ... and the standby takes over without Redis, under a new epoch.
    assert (await b.ha.run_cycle()) == (
        "store unreachable: promoted to primary (epoch 2) holding the arbiter lock"
    )
    assert b.ha.is_primary() and not a.ha.is_primary()
    assert "FAILOVER_INITIATED from sglang-01 to sglang-02 (arbiter lock)" in b.emitted()
    # Redis returns: the new primary's lease is written under its epoch; a follows.
    store.down = False
    clock.advance(0.5)
    assert (await b.ha.run_cycle()) == "renewed lease as primary (epoch 2)"
    assert store.leader == (2, "sglang-02")
    a.engine.set(EngineState.HEALTHY)
    assert (await a.ha.run_cycle()).startswith("following sglang-02 (epoch 2)")


async def test_without_arbiter_nobody_is_promoted_while_redis_is_away(
    a: Node, b: Node, store: FakeStore, clock: FakeClock
) -> None:
    await a.ha.run_cycle()
    await b.ha.run_cycle()
    store.down = True
    a.engine.set(EngineState.DEAD, "crash")
    for _ in range(10):
        clock.advance(0.5)
        await a.ha.run_cycle()
        assert (await b.ha.run_cycle()).endswith("no promotion without the store")
