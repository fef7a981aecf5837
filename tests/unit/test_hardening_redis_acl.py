"""The agents' Redis ACL user, with the exact rule of images/redis/entrypoint.sh:
everything the lease store does works under it; everything else is refused."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis import exceptions as rexc

from ha_agent.config import DynamicConfig, RedisSettings
from ha_agent.dcs.base import HAEvent, Member, Switchover
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from tests.support.processes import RedisProcess

ENTRYPOINT = Path(__file__).resolve().parents[2] / "images" / "redis" / "entrypoint.sh"
USER, PASSWORD = "sglang-ha", "agent-password-for-tests"


def acl_rule() -> list[str]:
    match = re.search(r'^SGLANG_HA_ACL="([^"]+)"$', ENTRYPOINT.read_text(), re.M)
    assert match, "SGLANG_HA_ACL not found in the Redis entrypoint"
    return match.group(1).split()


@pytest.fixture
async def admin(redis_proc: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_proc.url, password=redis_proc.password)
    await client.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", *acl_rule())
    yield client
    await client.aclose()


@pytest.fixture
async def agent_store(
    redis_proc: RedisProcess, admin: aioredis.Redis
) -> AsyncIterator[RedisLeaseStore]:
    settings = RedisSettings(
        cluster="acl",
        redis_url=redis_proc.url,
        redis_username=USER,
        redis_password=SecretStr(PASSWORD),
    )
    store = RedisLeaseStore(settings, retry_timeout=1.0)
    yield store
    await store.close()


async def test_the_lease_store_works_under_the_agent_user(
    agent_store: RedisLeaseStore, admin: aioredis.Redis
) -> None:
    s = agent_store
    notifications: list[str] = []

    async def follow() -> None:
        async for message in s.watch():
            notifications.append(message)

    watcher = asyncio.ensure_future(follow())
    try:
        await asyncio.sleep(0.2)  # subscribed (the channel is sglang-ha:acl:leader)
        member = Member("sglang-01", "http://a:30000", "http://a:8008")
        await s.register(member, ttl=10)
        epoch = await s.acquire("sglang-01", ttl=5, min_epoch=0)
        assert epoch == 1
        assert await s.renew("sglang-01", 1, ttl=5)
        cluster = await s.get_cluster()
        assert cluster.leader is not None and cluster.leader.node == "sglang-01"
        assert [m.name for m in cluster.members] == ["sglang-01"]
        await s.set_paused(True)
        await s.set_paused(False)
        await s.request_switchover(Switchover("sglang-01", "sglang-02", time.time()), ttl=5)
        await s.clear_switchover()
        await s.append_event(HAEvent(time.time(), "TEST", "sglang-01", "acl"))
        assert [e.event for e in await s.history(10)] == ["TEST"]
        assert await s.release("sglang-01", 1)
        assert await s.force_release() == 2
        # The dynamic config: read every cycle, written by an agent's /ha/config.
        config = DynamicConfig(lease_ttl=3.0)
        assert await s.set_config(config, previous=DynamicConfig())
        assert (await s.get_cluster()).config == config
        await s.forget("sglang-01")
        deadline = time.monotonic() + 5
        while not any(n.startswith("acquired") for n in notifications):
            assert time.monotonic() < deadline, notifications
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
    # The agent really ran as the restricted user, not as default.
    clients = (await admin.execute_command("CLIENT", "LIST")).decode()
    assert f"user={USER}" in clients


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "requirepass"),
        ("CONFIG", "SET", "requirepass", "x"),
        ("KEYS", "*"),
        ("SHUTDOWN", "NOSAVE"),
        ("REPLICAOF", "127.0.0.1", "1"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "evil", "on", ">x", "+@all"),
        ("SAVE",),
        ("INFO",),
        ("MONITOR",),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("FUNCTION", "FLUSH"),
        ("SCRIPT", "FLUSH"),
        ("SET", "other:key", "1"),
        ("GET", "other:key"),
        ("DEL", "other:key"),
        ("PUBLISH", "other-channel", "x"),
        ("EVAL", "return redis.call('SET', KEYS[1], '1')", "1", "other:key"),
        ("EVAL", "return redis.call('FLUSHALL')", "0"),
    ],
)
async def test_the_agent_user_can_do_nothing_else(
    redis_proc: RedisProcess, admin: aioredis.Redis, command: tuple[str, ...]
) -> None:
    await admin.set("other:key", "precious")
    agent = aioredis.from_url(redis_proc.url, username=USER, password=PASSWORD)
    try:
        with pytest.raises((rexc.NoPermissionError, rexc.ResponseError)) as refused:
            await agent.execute_command(*command)
        words = str(refused.value).lower()
        assert "permission" in words or "can't run this command" in words, words
    finally:
        await agent.aclose()
    assert await admin.get("other:key") == b"precious"
    assert await admin.ping()


async def test_wrong_agent_password_is_refused(
    redis_proc: RedisProcess, admin: aioredis.Redis
) -> None:
    agent = aioredis.from_url(redis_proc.url, username=USER, password="wrong")
    try:
        with pytest.raises(rexc.AuthenticationError):
            await agent.ping()
    finally:
        await agent.aclose()


def test_the_entrypoint_writes_the_user_with_a_hashed_password(tmp_path: Path) -> None:
    """Run the entrypoint's user line generation in a shell, as the container does."""
    import subprocess

    script = ENTRYPOINT.read_text()
    # Everything up to the role dispatch: the settings and functions, no exec.
    head = script[: script.index('case "${ROLE}" in')]
    base = {"REDIS_PASSWORD": "admin-pw", "PATH": "/usr/bin:/bin", "REDIS_DATA_DIR": str(tmp_path)}

    def acl_users(env: dict[str, str], settings: str = head) -> str:
        run = subprocess.run(
            ["sh", "-c", settings + "\nacl_users"],
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return run.stdout

    out = acl_users({**base, "HA_REDIS_PASSWORD": PASSWORD})
    import hashlib

    digest = hashlib.sha256(PASSWORD.encode()).hexdigest()
    assert out.strip() == f"user sglang-ha on #{digest} " + " ".join(acl_rule())
    assert PASSWORD not in out
    # The Sentinels' user, from its hash file (the server never sees the password).
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "redis_sentinel_password.sha256").write_text("ab" * 32 + "\n")
    out = acl_users(base, head.replace("/run/secrets/", f"{secrets}/"))
    assert out.startswith("user sentinel on #" + "ab" * 32 + " resetchannels &* -@all "), out
    none = acl_users(base)
    assert none == "", "no passwords: no ACL users"


async def test_the_sentinel_user_may_run_a_failover_and_nothing_else(
    redis_proc: RedisProcess, admin: aioredis.Redis
) -> None:
    """The Sentinels' ACL user (images/redis/entrypoint.sh SENTINEL_ACL): every
    command a Sentinel sends to monitor and fail over, and no data or other admin."""
    match = re.search(r'^SENTINEL_ACL="([^"]+)"$', ENTRYPOINT.read_text(), re.M)
    assert match
    await admin.execute_command(
        "ACL", "SETUSER", "sentinel", "on", ">sentinel-pw", *match.group(1).split()
    )
    await admin.set("sglang-ha:acl:k", "v")
    client = aioredis.from_url(redis_proc.url, username="sentinel", password="sentinel-pw")
    try:
        assert await client.ping()
        assert "role" in (await client.info("replication"))
        await client.execute_command("ROLE")
        await client.execute_command("CLIENT", "SETNAME", "sentinel-test")
        await client.publish("__sentinel__:hello", "x")
        async with client.pipeline(transaction=True) as pipe:  # MULTI ... EXEC
            pipe.ping()
            await pipe.execute()
        await client.execute_command("REPLICAOF", "NO", "ONE")  # a no-op on a master
        for command in (
            ("GET", "sglang-ha:acl:k"),
            ("SET", "x", "1"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "requirepass"),
            ("ACL", "LIST"),
            ("KEYS", "*"),
            ("SHUTDOWN",),
        ):
            with pytest.raises(aioredis.ResponseError, match="no permissions"):
                await client.execute_command(*command)
    finally:
        await client.aclose()
    assert await admin.get("sglang-ha:acl:k") == b"v"
