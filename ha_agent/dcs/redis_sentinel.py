"""The lease in Redis, reached through Sentinel (redis-py).

Keys, all under ``sglang-ha:<cluster>:``:

- ``leader``      "<epoch>:<node>" with a PX TTL: the lease. Taken only when free,
                  renewed and released only by its holder (compare-and-set scripts).
- ``epoch``       the fencing epoch counter; never goes down, incremented at each
                  acquisition. Consumers (the relay) refuse anything older.
- ``members``     set of node names; ``member:<name>`` JSON with a TTL (discovery).
- ``paused``      "1" while automatic actions are suspended (maintenance).
- ``switchover``  a planned hand-over request, with a TTL.
- ``events``      stream of HA events (history).
- ``config``      the cluster-wide dynamic settings (`DynamicConfig` as JSON, only
                  the values set): read by every agent each cycle and by the relay
                  each refresh; written only through an agent's authenticated
                  /ha/config (`sglang-ha edit-config`), compare-and-set.
- channel ``leader`` is published on every acquisition and release, and on a
  config change ("config") or a node's removal ("removed <node>").

Why writes of ``config`` go through the agents: the agents' restricted ACL user
(images/redis/entrypoint.sh) already reads and writes ``sglang-ha:*``, so the
operator needs only the admin token they use for a switchover, never the Redis
admin password, and the agent validates the change with the same code that
applies it.

Why the scripts take a ``min_epoch``: replication is asynchronous, so a Sentinel
failover can lose the latest epoch increment. Every agent passes the highest epoch
it has seen, and the counter is lifted past it, so epochs stay monotonic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff

from ha_agent.config import DynamicConfig, RedisSettings
from ha_agent.dcs.base import (
    Cluster,
    DCSError,
    HAEvent,
    Leader,
    LeaseStore,
    Member,
    NodeRemoved,
    Switchover,
    lease_token,
    parse_token,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MASTER_CHECK_INTERVAL = 2.0

# Errors that mean "the store is away or moving", as opposed to a bug.
_TRANSIENT = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.BusyLoadingError,
    MasterNotFoundError,
    OSError,
    asyncio.TimeoutError,
)

# A retried acquire must not lose the lease it already won: if the holder is the
# caller itself (reply lost, agent restarted), it gets its own epoch back.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  if sep and string.sub(cur, sep + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(cur, 1, sep - 1))
  end
  return 0
end
local e = tonumber(redis.call('GET', KEYS[2]) or '0')
local floor = tonumber(ARGV[3])
if floor > e then e = floor end
e = e + 1
redis.call('SET', KEYS[2], e)
redis.call('SET', KEYS[1], e .. ':' .. ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[4], 'acquired ' .. e .. ':' .. ARGV[1])
return e
"""

# 1: renewed. 2: the key had vanished with no successor (lost in a Redis failover),
# or named an older epoch than ours (we were promoted by the file arbiter while
# Redis was away), and now holds ours. 0: someone holds a newer or equal epoch:
# the caller has lost the lease.
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local mine = tonumber(ARGV[3])
local held = nil
if cur then
  local sep = string.find(cur, ':', 1, true)
  held = tonumber(string.sub(cur, 1, (sep or 1) - 1)) or mine
end
if cur == false or held < mine then
  local e = tonumber(redis.call('GET', KEYS[2]) or '0')
  if e <= mine then
    redis.call('SET', KEYS[2], mine)
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 2
  end
end
return 0
"""

# Compare-and-set of the dynamic config: an absent key reads as "{}".
_SET_CONFIG = """
local cur = redis.call('GET', KEYS[1]) or '{}'
if cur ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], 'config')
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released ' .. ARGV[1])
  return 1
end
return 0
"""


class MajoritySentinel(Sentinel):
    """Sentinel client that trusts the master a majority of Sentinels name.

    redis-py's `discover_master` takes the first Sentinel that answers; a Sentinel
    on the wrong side of a partition can still name the old master. Asking all of
    them and requiring a majority keeps a minority from steering our writes.
    """

    ask_timeout = 0.5

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        async def ask(sentinel: Any) -> tuple[str, int] | None:
            try:
                # Bounded per Sentinel: a dead one must not make the live ones late.
                masters = await asyncio.wait_for(sentinel.sentinel_masters(), self.ask_timeout)
            except (rexc.ConnectionError, rexc.TimeoutError, OSError, asyncio.TimeoutError):
                return None
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                return state["ip"], int(state["port"])
            return None

        answers = await asyncio.gather(*(ask(s) for s in self.sentinels))
        votes = Counter(a for a in answers if a is not None)
        if votes:
            address, count = votes.most_common(1)[0]
            if count > len(self.sentinels) // 2:
                return address
        raise MasterNotFoundError(
            f"no majority of {len(self.sentinels)} Sentinels names a master for {service_name!r}"
            f" (answers: {dict(votes)})"
        )


class RedisLeaseStore(LeaseStore):
    def __init__(self, settings: RedisSettings, retry_timeout: float = 0.75) -> None:
        self.settings = settings
        self.retry_timeout = retry_timeout
        prefix = f"sglang-ha:{settings.cluster}:"
        self.k_leader = prefix + "leader"
        self.k_epoch = prefix + "epoch"
        self.k_members = prefix + "members"
        self.k_member = prefix + "member:"
        self.k_paused = prefix + "paused"
        self.k_switchover = prefix + "switchover"
        self.k_events = prefix + "events"
        self.k_config = prefix + "config"
        self.channel = prefix + "leader"
        # redis-py's command typing is a union of sync and async results; Any keeps
        # the call sites readable.
        self._sentinel: MajoritySentinel | None = None
        self._master_checked_at = -1e9
        self._client: Any = self._connect()
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._set_config = self._client.register_script(_SET_CONFIG)
        self._closed = False

    def _connect(self) -> aioredis.Redis:
        s = self.settings
        password = s.redis_password.get_secret_value() if s.redis_password else None
        common: dict[str, Any] = {
            "username": s.redis_username,
            "password": password,
            "socket_timeout": s.redis_timeout,
            "socket_connect_timeout": s.redis_timeout,
            "decode_responses": True,
            "health_check_interval": 5,
            # Our own loop (_call) retries within retry_timeout; redis-py's default
            # retries with backoff would stretch one call past every deadline.
            "retry": Retry(NoBackoff(), 0),
        }
        if s.redis_url:
            return aioredis.from_url(s.redis_url, **common)
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": s.redis_timeout,
            "socket_connect_timeout": s.redis_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if s.sentinel_password:
            sentinel_kwargs["password"] = s.sentinel_password.get_secret_value()
        sentinel = MajoritySentinel(s.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs)
        sentinel.ask_timeout = s.redis_timeout
        self._sentinel = sentinel
        return sentinel.master_for(s.sentinel_master, **common)

    async def _verify_master(self) -> None:
        """Every couple of seconds, ask the Sentinels who the master is.

        Why: pooled connections keep working when the Sentinels are gone or split,
        and then nothing tells us whether the Redis we write to is still the one a
        majority trusts. Losing that majority is a degraded mode like losing Redis.
        """
        if self._sentinel is None:
            return
        now = time.monotonic()
        if now - self._master_checked_at < MASTER_CHECK_INTERVAL:
            return
        try:
            await asyncio.wait_for(
                self._sentinel.discover_master(self.settings.sentinel_master),
                timeout=self.settings.redis_timeout + 0.5,
            )
        except (MasterNotFoundError, asyncio.TimeoutError, OSError) as exc:
            raise DCSError(f"Sentinels: {exc or 'no answer'}") from exc
        self._master_checked_at = now

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one store operation, retrying transient errors until retry_timeout."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(fn(), timeout=max(remaining, 0.01))
            except (rexc.AuthenticationError, rexc.AuthenticationWrongNumberOfArgsError) as exc:
                # Not transient: say so clearly instead of retrying a wrong password.
                raise DCSError(f"{what}: Redis refused our credentials ({exc})") from exc
            except _TRANSIENT as exc:
                if time.monotonic() + delay >= deadline:
                    raise DCSError(f"{what}: {type(exc).__name__}: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)

    async def get_cluster(self) -> Cluster:
        await self._verify_master()

        async def read() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self.k_leader)
                pipe.pttl(self.k_leader)
                pipe.get(self.k_epoch)
                pipe.get(self.k_paused)
                pipe.get(self.k_switchover)
                pipe.get(self.k_config)
                pipe.smembers(self.k_members)
                result: list[Any] = await pipe.execute()
            names = sorted(result[6])
            raw_members = (
                await self._client.mget([self.k_member + n for n in names]) if names else []
            )
            return [*result[:6], raw_members]

        raw_leader, pttl, raw_epoch, paused, raw_switch, raw_config, raw_members = await self._call(
            "read cluster", read
        )
        leader = None
        if raw_leader:
            epoch, node = parse_token(raw_leader)
            leader = Leader(node=node, epoch=epoch, ttl_ms=max(int(pttl), 0))
        members = []
        for raw in raw_members:
            if raw:
                with contextlib.suppress(ValueError, TypeError):
                    members.append(Member.from_json(raw))
        switchover = None
        if raw_switch:
            with contextlib.suppress(ValueError, TypeError):
                switchover = Switchover.from_json(raw_switch)
        config: DynamicConfig | None = None
        with contextlib.suppress(ValueError):
            config = DynamicConfig.model_validate_json(raw_config or "{}")
        max_epoch = max(int(raw_epoch or 0), leader.epoch if leader else 0)
        return Cluster(
            leader=leader,
            members=tuple(members),
            max_epoch=max_epoch,
            paused=paused == "1",
            switchover=switchover,
            config=config,
        )

    async def acquire(self, node: str, ttl: float, min_epoch: int) -> int | None:
        keys = [self.k_leader, self.k_epoch]
        args: list[str | int] = [node, int(ttl * 1000), min_epoch, self.channel]
        epoch = int(await self._call("acquire", lambda: self._acquire(keys=keys, args=args)))
        if not epoch:
            return None
        # Why WAIT: make the new lease survive a Sentinel failover right after it
        # was taken. Bounded and best effort: with no replica it returns 0 at once.
        with contextlib.suppress(*_TRANSIENT, DCSError):
            await self._call("wait", lambda: self._client.wait(1, 100))
        return epoch

    async def renew(self, node: str, epoch: int, ttl: float) -> bool:
        keys = [self.k_leader, self.k_epoch]
        args: list[str | int] = [lease_token(epoch, node), int(ttl * 1000), epoch]
        result = int(await self._call("renew", lambda: self._renew(keys=keys, args=args)))
        if result == 2:
            log.warning("lease key had vanished (Redis failover?); restored under epoch %d", epoch)
        return result > 0

    async def release(self, node: str, epoch: int) -> bool:
        keys = [self.k_leader]
        args = [lease_token(epoch, node), self.channel]
        return bool(await self._call("release", lambda: self._release(keys=keys, args=args)))

    async def force_release(self) -> int:
        async def write() -> int:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.incr(self.k_epoch)
                pipe.delete(self.k_leader)
                pipe.publish(self.channel, "forced release")
                result = await pipe.execute()
            return int(result[0])

        return await self._call("force release", write)

    async def register(self, member: Member, ttl: float) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.sadd(self.k_members, member.name)
                pipe.set(self.k_member + member.name, member.to_json(), px=int(ttl * 1000))
                await pipe.execute()

        await self._call("register", write)

    async def forget(self, name: str) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.srem(self.k_members, name)
                pipe.delete(self.k_member + name)
                pipe.publish(self.channel, NodeRemoved(name).encode())
                await pipe.execute()

        await self._call("forget", write)

    async def get_config(self) -> DynamicConfig:
        raw = await self._call("read config", lambda: self._client.get(self.k_config))
        return DynamicConfig.model_validate_json(raw or "{}")

    async def set_config(self, config: DynamicConfig, previous: DynamicConfig) -> bool:
        keys = [self.k_config]
        args = [previous.to_json(), config.to_json(), self.channel]
        return bool(
            await self._call("write config", lambda: self._set_config(keys=keys, args=args))
        )

    async def set_paused(self, paused: bool) -> None:
        if paused:
            await self._call("pause", lambda: self._client.set(self.k_paused, "1"))
        else:
            await self._call("resume", lambda: self._client.delete(self.k_paused))
        await self._call(
            "notify", lambda: self._client.publish(self.channel, f"paused {int(paused)}")
        )

    async def request_switchover(self, switchover: Switchover, ttl: float) -> None:
        await self._call(
            "switchover",
            lambda: self._client.set(self.k_switchover, switchover.to_json(), px=int(ttl * 1000)),
        )
        await self._call("notify", lambda: self._client.publish(self.channel, "switchover"))

    async def clear_switchover(self) -> None:
        await self._call("clear switchover", lambda: self._client.delete(self.k_switchover))

    async def append_event(self, event: HAEvent) -> None:
        await self._call(
            "append event",
            lambda: self._client.xadd(
                self.k_events, event.to_fields(), maxlen=10000, approximate=True
            ),
        )

    async def history(self, count: int = 100) -> list[HAEvent]:
        rows = await self._call(
            "history", lambda: self._client.xrevrange(self.k_events, count=count)
        )
        return [HAEvent.from_fields(fields) for _id, fields in reversed(rows)]

    async def watch(self) -> AsyncIterator[str]:
        """Lease-change notifications; reconnects by itself until close()."""
        delay = 0.2
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                delay = 0.2
                while not self._closed:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg and msg.get("type") == "message":
                        yield str(msg["data"])
            except _TRANSIENT as exc:
                log.debug("leader channel lost: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            await self._client.aclose()
