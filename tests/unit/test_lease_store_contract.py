"""The lease-store contract, run against both stores: the fake the HA state machine's
tests use (`tests/support/fakes.py`) and the real one on a real Redis. If the fake
drifts from Redis, these fail, and so the state-machine tests stay honest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from ha_agent.config import DynamicConfig, RedisSettings
from ha_agent.dcs.base import EngineState, HAEvent, LeaseStore, Member, Role, Switchover
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from tests.support.fakes import FakeClock, FakeStore
from tests.support.processes import RedisProcess


@dataclass
class Rig:
    store: LeaseStore
    # Let `seconds` of lease time pass, then check; the fake's clock is moved, the
    # real store is polled until the condition holds (bounded by `seconds` + 3 s).
    until: Callable[[Callable[[], Awaitable[bool]], float], Awaitable[None]]


@pytest.fixture(params=["fake", "redis"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    if request.param == "fake":
        clock = FakeClock()

        async def advance(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
            clock.advance(seconds)
            assert await check(), f"not true after {seconds}s of fake time"

        yield Rig(FakeStore(clock), advance)
        return
    redis_proc: RedisProcess = request.getfixturevalue("redis_proc")
    settings = RedisSettings(
        cluster=f"contract-{time.monotonic_ns()}",
        redis_url=redis_proc.url,
        redis_password=SecretStr(redis_proc.password),
    )
    store = RedisLeaseStore(settings, retry_timeout=0.5)

    async def poll(check: Callable[[], Awaitable[bool]], seconds: float) -> None:
        deadline = time.monotonic() + seconds + 3.0
        while not await check():
            assert time.monotonic() < deadline, f"not true {seconds + 3.0}s later"
            await asyncio.sleep(0.05)

    yield Rig(store, poll)
    await store.close()


async def test_only_one_node_can_hold_the_lease(rig: Rig) -> None:
    results = await asyncio.gather(
        *(rig.store.acquire(f"node-{i}", ttl=5, min_epoch=0) for i in range(8))
    )
    assert [r for r in results if r is not None] == [1]
    cluster = await rig.store.get_cluster()
    assert cluster.leader is not None and cluster.leader.epoch == 1
    assert 4000 < cluster.leader.ttl_ms <= 5000


async def test_epoch_grows_with_each_acquisition_and_respects_the_floor(rig: Rig) -> None:
    s = rig.store
    assert await s.acquire("a", ttl=5, min_epoch=0) == 1
    assert await s.release("a", 1)
    assert await s.acquire("b", ttl=5, min_epoch=0) == 2
    assert await s.release("b", 2)
    # An agent that has seen epoch 9 (the store lost it in a Redis failover) lifts it.
    assert await s.acquire("a", ttl=5, min_epoch=9) == 10
    assert (await s.get_cluster()).max_epoch == 10


async def test_retried_acquire_returns_the_lease_already_won(rig: Rig) -> None:
    first = await rig.store.acquire("a", ttl=5, min_epoch=0)
    again = await rig.store.acquire("a", ttl=5, min_epoch=0)
    assert first == again == 1
    assert await rig.store.acquire("b", ttl=5, min_epoch=0) is None


async def test_only_the_holder_can_renew_or_release(rig: Rig) -> None:
    s = rig.store
    epoch = await s.acquire("a", ttl=5, min_epoch=0)
    assert epoch is not None
    assert not await s.renew("b", epoch, ttl=5)
    assert not await s.renew("b", epoch - 1, ttl=5)
    assert not await s.release("b", epoch)
    assert await s.renew("a", epoch, ttl=5)
    assert await s.release("a", epoch)
    assert (await s.get_cluster()).leader is None


async def test_lease_expires_when_not_renewed(rig: Rig) -> None:
    s = rig.store
    assert await s.acquire("a", ttl=0.3, min_epoch=0) == 1

    async def expired() -> bool:
        return (await s.get_cluster()).leader is None

    await rig.until(expired, 0.3)
    assert await s.acquire("b", ttl=5, min_epoch=0) == 2


async def test_a_newer_epoch_supersedes_an_older_lease(rig: Rig) -> None:
    """A node promoted by the file arbiter while Redis was away writes its lease back."""
    s = rig.store
    assert await s.acquire("a", ttl=5, min_epoch=0) == 1
    assert await s.renew("b", 2, ttl=5)
    cluster = await s.get_cluster()
    assert cluster.leader is not None and (cluster.leader.node, cluster.leader.epoch) == ("b", 2)
    assert cluster.max_epoch == 2
    assert not await s.renew("a", 1, ttl=5), "the old holder cannot renew back"


async def test_forced_release_bumps_the_epoch_past_the_holder(rig: Rig) -> None:
    s = rig.store
    epoch = await s.acquire("a", ttl=5, min_epoch=0)
    assert epoch == 1
    assert await s.force_release() == 2
    assert (await s.get_cluster()).leader is None
    assert not await s.renew("a", epoch, ttl=5)
    assert await s.acquire("b", ttl=5, min_epoch=0) == 3


async def test_registry_members_expire(rig: Rig) -> None:
    s = rig.store
    await s.register(Member("a", "http://a:30000", "http://a:8008"), ttl=0.3)
    await s.register(Member("b", "http://b:30000", "http://b:8008"), ttl=5)
    assert {m.name for m in (await s.get_cluster()).members} == {"a", "b"}

    async def only_b() -> bool:
        return {m.name for m in (await s.get_cluster()).members} == {"b"}

    await rig.until(only_b, 0.3)


async def test_pause_and_switchover_flags(rig: Rig) -> None:
    s = rig.store
    await s.set_paused(True)
    await s.request_switchover(Switchover("a", "b", time.time()), ttl=5)
    cluster = await s.get_cluster()
    assert cluster.paused
    assert cluster.switchover is not None and cluster.switchover.to_node == "b"
    await s.set_paused(False)
    await s.clear_switchover()
    cluster = await s.get_cluster()
    assert not cluster.paused and cluster.switchover is None


async def test_history_keeps_events_in_order(rig: Rig) -> None:
    for i in range(3):
        await rig.store.append_event(
            HAEvent(ts=time.time(), event=f"E{i}", node="a", detail=str(i))
        )
    assert [e.event for e in await rig.store.history(10)] == ["E0", "E1", "E2"]
    assert [e.event for e in await rig.store.history(2)] == ["E1", "E2"]


async def test_dynamic_config_is_empty_until_set_and_read_back_each_cycle(rig: Rig) -> None:
    s = rig.store
    empty = DynamicConfig()
    assert await s.get_config() == empty
    assert (await s.get_cluster()).config == empty
    new = DynamicConfig(lease_ttl=4.0, failback="preferred")
    assert await s.set_config(new, previous=empty)
    assert await s.get_config() == new
    assert (await s.get_cluster()).config == new, "agents read it with the cluster snapshot"
    # Unsetting a value stores what is left.
    assert await s.set_config(DynamicConfig(failback="preferred"), previous=new)
    assert (await s.get_config()).values() == {"failback": "preferred"}


async def test_dynamic_config_write_is_compare_and_set(rig: Rig) -> None:
    s = rig.store
    first = DynamicConfig(warm_rate=1.0)
    assert await s.set_config(first, previous=DynamicConfig())
    # An editor that read the config before `first` was stored must not undo it.
    assert not await s.set_config(DynamicConfig(loop_wait=0.4), previous=DynamicConfig())
    assert await s.get_config() == first


async def test_forget_drops_a_member_from_the_registry(rig: Rig) -> None:
    s = rig.store
    await s.register(Member("a", "http://a:30000", "http://a:8008"), ttl=5)
    await s.register(Member("b", "http://b:30000", "http://b:8008"), ttl=5)
    await s.forget("b")
    assert {m.name for m in (await s.get_cluster()).members} == {"a"}


async def test_members_read_back_with_their_role_and_engine_state(rig: Rig) -> None:
    s = rig.store
    member = Member(
        "a",
        "http://a:30000",
        "http://a:8008",
        role=Role.PRIMARY,
        epoch=3,
        engine_health=EngineState.HEALTHY,
    )
    await s.register(member, ttl=5)
    (read,) = (await s.get_cluster()).members
    assert read.role is Role.PRIMARY and read.engine_health is EngineState.HEALTHY
    assert read == member


async def test_members_read_back_serving_or_not(rig: Rig) -> None:
    s = rig.store
    await s.register(Member("a", "http://a:30000", "http://a:8008", serving=True), ttl=5)
    await s.register(Member("b", "http://b:30000", "http://b:8008"), ttl=5)
    serving = {m.name: m.serving for m in (await s.get_cluster()).members}
    assert serving == {"a": True, "b": False}
