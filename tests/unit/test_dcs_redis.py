"""The lease in a real Redis: atomic acquisition, fencing epochs, compare-and-set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from ha_agent.config import RedisSettings
from ha_agent.dcs.base import DCSError, HAEvent, Member, Switchover
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from tests.support.processes import RedisProcess


def make_store(redis_proc: RedisProcess, cluster: str = "t") -> RedisLeaseStore:
    settings = RedisSettings(
        cluster=cluster, redis_url=redis_proc.url, redis_password=SecretStr(redis_proc.password)
    )
    return RedisLeaseStore(settings, retry_timeout=0.5)


@pytest.fixture
async def store(redis_proc: RedisProcess) -> AsyncIterator[RedisLeaseStore]:
    s = make_store(redis_proc)
    yield s
    await s.close()


async def test_only_one_node_can_hold_the_lease(store: RedisLeaseStore) -> None:
    results = await asyncio.gather(
        *(store.acquire(f"node-{i}", ttl=5, min_epoch=0) for i in range(8))
    )
    winners = [r for r in results if r is not None]
    assert winners == [1]
    cluster = await store.get_cluster()
    assert cluster.leader is not None and cluster.leader.epoch == 1
    assert 4000 < cluster.leader.ttl_ms <= 5000


async def test_epoch_grows_with_each_acquisition_and_respects_the_floor(
    store: RedisLeaseStore,
) -> None:
    assert await store.acquire("a", ttl=5, min_epoch=0) == 1
    assert await store.release("a", 1)
    assert await store.acquire("b", ttl=5, min_epoch=0) == 2
    assert await store.release("b", 2)
    # An agent that has seen epoch 9 (the store lost it in a Redis failover) lifts it.
    assert await store.acquire("a", ttl=5, min_epoch=9) == 10
    assert (await store.get_cluster()).max_epoch == 10


async def test_retried_acquire_returns_the_lease_already_won(store: RedisLeaseStore) -> None:
    first = await store.acquire("a", ttl=5, min_epoch=0)
    again = await store.acquire("a", ttl=5, min_epoch=0)
    assert first == again == 1
    assert await store.acquire("b", ttl=5, min_epoch=0) is None


async def test_only_the_holder_can_renew_or_release(store: RedisLeaseStore) -> None:
    epoch = await store.acquire("a", ttl=5, min_epoch=0)
    assert epoch is not None
    assert not await store.renew("b", epoch, ttl=5)
    assert not await store.renew("b", epoch - 1, ttl=5)
    assert not await store.release("b", epoch)
    assert await store.renew("a", epoch, ttl=5)
    assert await store.release("a", epoch)
    assert (await store.get_cluster()).leader is None


async def test_lease_expires_when_not_renewed(store: RedisLeaseStore) -> None:
    assert await store.acquire("a", ttl=0.3, min_epoch=0) == 1
    deadline = time.monotonic() + 3
    while (await store.get_cluster()).leader is not None:
        assert time.monotonic() < deadline, "lease did not expire"
        await asyncio.sleep(0.05)
    assert await store.acquire("b", ttl=5, min_epoch=0) == 2


async def test_renew_puts_back_a_lost_key_unless_a_newer_epoch_exists(
    store: RedisLeaseStore, redis_proc: RedisProcess
) -> None:
    epoch = await store.acquire("a", ttl=5, min_epoch=0)
    assert epoch == 1
    # Simulate a Redis failover that lost the key but not the counter.
    await store._client.delete(store.k_leader)
    assert await store.renew("a", epoch, ttl=5)
    cluster = await store.get_cluster()
    assert cluster.leader is not None and cluster.leader.node == "a" and cluster.leader.epoch == 1
    # A forced failover bumps the epoch: the old holder can no longer renew back.
    await store.force_release()
    assert not await store.renew("a", epoch, ttl=5)


async def test_a_newer_epoch_supersedes_an_older_lease(store: RedisLeaseStore) -> None:
    """A node promoted by the file arbiter while Redis was away writes its lease back."""
    assert await store.acquire("a", ttl=5, min_epoch=0) == 1
    assert await store.renew("b", 2, ttl=5)
    cluster = await store.get_cluster()
    assert cluster.leader is not None and (cluster.leader.node, cluster.leader.epoch) == ("b", 2)
    assert cluster.max_epoch == 2
    assert not await store.renew("a", 1, ttl=5), "the old holder cannot renew back"


async def test_registry_members_expire(store: RedisLeaseStore) -> None:
    await store.register(Member("a", "http://a:30000", "http://a:8008"), ttl=0.3)
    await store.register(Member("b", "http://b:30000", "http://b:8008"), ttl=5)
    names = {m.name for m in (await store.get_cluster()).members}
    assert names == {"a", "b"}
    deadline = time.monotonic() + 3
    while {m.name for m in (await store.get_cluster()).members} != {"b"}:
        assert time.monotonic() < deadline, "member a did not expire"
        await asyncio.sleep(0.05)


async def test_pause_and_switchover_flags(store: RedisLeaseStore) -> None:
    await store.set_paused(True)
    await store.request_switchover(Switchover("a", "b", time.time()), ttl=5)
    cluster = await store.get_cluster()
    assert cluster.paused
    assert cluster.switchover is not None and cluster.switchover.to_node == "b"
    await store.set_paused(False)
    await store.clear_switchover()
    cluster = await store.get_cluster()
    assert not cluster.paused and cluster.switchover is None


async def test_history_keeps_events_in_order(store: RedisLeaseStore) -> None:
    for i in range(3):
        await store.append_event(HAEvent(ts=time.time(), event=f"E{i}", node="a", detail=str(i)))
    history = await store.history(10)
    assert [e.event for e in history] == ["E0", "E1", "E2"]


async def test_watchers_hear_acquire_and_release(store: RedisLeaseStore) -> None:
    heard: list[str] = []

    async def listen() -> None:
        async for message in store.watch():
            heard.append(message)
            if len(heard) == 2:
                return

    task = asyncio.ensure_future(listen())
    await asyncio.sleep(0.3)  # let the subscription start
    epoch = await store.acquire("a", ttl=5, min_epoch=0)
    assert epoch is not None
    await store.release("a", epoch)
    await asyncio.wait_for(task, timeout=5)
    assert heard == ["acquired 1:a", "released 1:a"]


async def test_unreachable_store_raises_dcs_error_within_retry_timeout(
    redis_proc: RedisProcess,
) -> None:
    store = make_store(redis_proc)
    try:
        await store.get_cluster()
        redis_proc.pause()
        started = time.monotonic()
        with pytest.raises(DCSError):
            await store.renew("a", 1, ttl=5)
        assert time.monotonic() - started < 2.0
    finally:
        redis_proc.resume()
        await store.close()


async def test_wrong_password_is_an_error_not_a_hang(redis_proc: RedisProcess) -> None:
    settings = RedisSettings(
        cluster="t", redis_url=redis_proc.url, redis_password=SecretStr("wrong")
    )
    store = RedisLeaseStore(settings, retry_timeout=0.5)
    try:
        with pytest.raises(DCSError, match="credentials"):
            await store.get_cluster()
    finally:
        await store.close()


async def test_through_sentinels_a_majority_must_name_the_master(redis_proc: RedisProcess) -> None:
    from tests.support.processes import sentinels

    with sentinels(redis_proc) as sset:
        settings = RedisSettings(
            cluster="s",
            sentinels=[f"127.0.0.1:{p}" for p in sset.ports],
            redis_password=SecretStr(redis_proc.password),
            sentinel_password=SecretStr(redis_proc.password),
        )
        store = RedisLeaseStore(settings, retry_timeout=0.5)
        try:
            assert await store.acquire("a", ttl=5, min_epoch=0) == 1
            sset.stop(0)  # one of three gone: still a majority
            store._master_checked_at = -1e9
            assert (await store.get_cluster()).leader is not None
            sset.stop(1)  # two of three gone: no majority, even though Redis answers
            store._master_checked_at = -1e9
            with pytest.raises(DCSError, match="Sentinels"):
                await store.get_cluster()
        finally:
            await store.close()
