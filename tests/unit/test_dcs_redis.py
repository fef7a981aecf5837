"""What only the real Redis store does: lost keys put back, notifications, outages,
authentication and Sentinel. The lease semantics both stores share are in
test_lease_store_contract.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from ha_agent.config import RedisSettings
from ha_agent.dcs.base import DCSError, EngineState, Member, NodeRemoved, Role
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


async def test_a_member_is_stored_as_the_json_older_agents_wrote(store: RedisLeaseStore) -> None:
    member = Member(
        "a", "http://a:30000", "http://a:8008", role=Role.PRIMARY, engine_health=EngineState.HUNG
    )
    await store.register(member, ttl=5)
    stored = json.loads(await store._client.get(store.k_member + "a"))
    assert stored["role"] == "primary" and stored["engine_health"] == "hung"
    assert stored["serving"] is False


async def test_a_member_from_an_agent_without_serving_reads_as_not_serving(
    store: RedisLeaseStore,
) -> None:
    older = {
        "name": "a",
        "engine_url": "http://a:30000",
        "api_url": "http://a:8008",
        "role": "standby",
        "epoch": 0,
        "engine_health": "healthy",
        "priority": 0,
        "updated": time.time(),
    }
    await store._client.set(store.k_member + "a", json.dumps(older), px=5000)
    await store._client.sadd(store.k_members, "a")
    (member,) = (await store.get_cluster()).members
    assert member.serving is False and member.engine_health is EngineState.HEALTHY


async def test_removing_a_node_tells_the_watchers_which_one(store: RedisLeaseStore) -> None:
    heard: list[str] = []

    async def listen() -> None:
        async for message in store.watch():
            heard.append(message)
            return

    task = asyncio.ensure_future(listen())
    await asyncio.sleep(0.3)  # let the subscription start
    await store.register(Member("b", "http://b:30000", "http://b:8008"), ttl=5)
    await store.forget("b")
    await asyncio.wait_for(task, timeout=5)
    assert heard == ["removed b"], "the notice relays and agents of another version parse"
    assert NodeRemoved.decode(heard[0]) == NodeRemoved("b")
    assert NodeRemoved.decode("released 1:b") is None


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
