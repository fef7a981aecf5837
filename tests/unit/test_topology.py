"""The relay's view: epochs only go up, the registry adds and (eventually) removes."""

from __future__ import annotations

from ha_agent.config import RelaySettings
from ha_agent.dcs.base import Member
from ha_agent.events import EventLog
from ha_agent.gateway.upstream import topology as topo
from ha_agent.gateway.upstream.topology import Topology
from tests.support.fakes import FakeClock, FakeStore


def make(store: FakeStore, clock: FakeClock, seeds: list[str] | None = None) -> Topology:
    settings = RelaySettings(nodes=seeds or [], redis_url="redis://unused")
    t = Topology(settings, store, EventLog(None, "relay"), clock=clock)

    async def no_polls() -> None:  # agents are not part of these tests
        return None

    t._poll_agents = no_polls  # type: ignore[method-assign]
    return t


async def test_a_leader_under_an_older_epoch_is_never_primary(clock: FakeClock) -> None:
    store = FakeStore(clock)
    t = make(store, clock)
    await store.acquire("sglang-01", ttl=60, min_epoch=4)  # epoch 5
    await t.refresh()
    assert (t.primary, t.epoch) == ("sglang-01", 5)
    # A Redis failover lost the latest writes: the store now names an older lease.
    store.leader, store.epoch = (3, "sglang-02"), 3
    await t.refresh()
    assert t.primary != "sglang-02" and t.epoch == 5


async def test_registry_nodes_are_added_and_forgotten_long_after_they_leave(
    clock: FakeClock,
) -> None:
    store = FakeStore(clock)
    t = make(store, clock, seeds=["seed=http://seed:30000=http://seed:8008"])
    await store.register(Member("sglang-03", "http://n3:30000", "http://n3:8008"), ttl=10)
    await t.refresh()
    assert set(t.nodes) == {"seed", "sglang-03"}
    clock.advance(11)  # its registry entry lapses: kept for now (it may just be down)
    await t.refresh()
    assert "sglang-03" in t.nodes
    clock.advance(topo.REMOVE_AFTER)
    await t.refresh()
    assert set(t.nodes) == {"seed"}, "seed nodes stay; a decommissioned node goes"


async def test_store_outage_keeps_the_last_primary(clock: FakeClock) -> None:
    store = FakeStore(clock)
    t = make(store, clock, seeds=["sglang-01=http://a:30000=http://a:8008"])
    await store.acquire("sglang-01", ttl=60, min_epoch=0)
    await t.refresh()
    store.down = True
    await t.refresh()
    assert t.degraded and t.primary == "sglang-01"
