"""In-memory stand-ins for unit tests of decision logic (never used in the stack)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ha_agent.config import DynamicConfig, RelaySettings
from ha_agent.dcs.base import (
    AgentStatus,
    Cluster,
    DCSError,
    EngineState,
    EngineStatus,
    HAEvent,
    Leader,
    LeaseStore,
    Member,
    NodeRemoved,
    Role,
    Switchover,
)
from ha_agent.events import EventLog
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.stream.relay import Relay
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import Transport
from ha_agent.node.engine.monitor import EngineHealth


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeStore(LeaseStore):
    """The lease semantics of redis_sentinel.py on a fake clock; can be 'down'."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down = False
        self.leader: tuple[int, str] | None = None
        self.expires = 0.0
        self.epoch = 0
        self.members: dict[str, tuple[Member, float]] = {}
        self.paused = False
        self.switchover: Switchover | None = None
        self.events: list[HAEvent] = []
        self.config_json = "{}"  # as stored: JSON, so a bad value can be planted
        self.notifications: list[str] = []

    def _check(self) -> None:
        if self.down:
            raise DCSError("store down")
        if self.leader is not None and self.clock() >= self.expires:
            self.leader = None

    async def get_cluster(self) -> Cluster:
        self._check()
        leader = None
        if self.leader:
            ttl = int((self.expires - self.clock()) * 1000)
            leader = Leader(node=self.leader[1], epoch=self.leader[0], ttl_ms=ttl)
        members = tuple(m for m, exp in self.members.values() if exp > self.clock())
        config: DynamicConfig | None
        try:
            config = DynamicConfig.model_validate_json(self.config_json)
        except ValueError:
            config = None
        return Cluster(
            leader,
            members,
            max(self.epoch, leader.epoch if leader else 0),
            self.paused,
            self.switchover,
            config,
        )

    async def acquire(self, node: str, ttl: float, min_epoch: int) -> int | None:
        self._check()
        if self.leader is not None:
            if self.leader[1] == node:
                self.expires = self.clock() + ttl
                return self.leader[0]
            return None
        self.epoch = max(self.epoch, min_epoch) + 1
        self.leader = (self.epoch, node)
        self.expires = self.clock() + ttl
        return self.epoch

    async def renew(self, node: str, epoch: int, ttl: float) -> bool:
        self._check()
        if self.leader == (epoch, node):
            self.expires = self.clock() + ttl
            return True
        if (self.leader is None or self.leader[0] < epoch) and self.epoch <= epoch:
            self.epoch = epoch
            self.leader, self.expires = (epoch, node), self.clock() + ttl
            return True
        return False

    async def release(self, node: str, epoch: int) -> bool:
        self._check()
        if self.leader == (epoch, node):
            self.leader = None
            return True
        return False

    async def force_release(self) -> int:
        self._check()
        self.epoch += 1
        self.leader = None
        return self.epoch

    async def register(self, member: Member, ttl: float) -> None:
        self._check()
        self.members[member.name] = (member, self.clock() + ttl)

    async def forget(self, name: str) -> None:
        self._check()
        self.members.pop(name, None)
        self.notifications.append(NodeRemoved(name).encode())

    async def get_config(self) -> DynamicConfig:
        self._check()
        return DynamicConfig.model_validate_json(self.config_json)

    async def set_config(self, config: DynamicConfig, previous: DynamicConfig) -> bool:
        self._check()
        if self.config_json != previous.to_json():
            return False
        self.config_json = config.to_json()
        self.notifications.append("config")
        return True

    async def set_paused(self, paused: bool) -> None:
        self._check()
        self.paused = paused

    async def request_switchover(self, switchover: Switchover, ttl: float) -> None:
        self._check()
        self.switchover = switchover

    async def clear_switchover(self) -> None:
        self._check()
        self.switchover = None

    async def append_event(self, event: HAEvent) -> None:
        self._check()
        self.events.append(event)

    async def history(self, count: int = 100) -> list[HAEvent]:
        self._check()
        return self.events[-count:]

    async def watch(self) -> AsyncIterator[str]:
        while True:
            await asyncio.sleep(3600)
            yield ""

    async def close(self) -> None:
        return None


class FakeEngine:
    """What Ha reads from the HealthMonitor: `.health` and change listeners."""

    def __init__(
        self, clock: Callable[[], float], state: EngineState = EngineState.HEALTHY
    ) -> None:
        self.clock = clock
        self.health = EngineHealth(state, "test", clock())
        self._listeners: list[Callable[[EngineHealth, EngineHealth], None]] = []

    def on_change(self, listener: Callable[[EngineHealth, EngineHealth], None]) -> None:
        self._listeners.append(listener)

    success_rate: float | None = None

    def recent_success_rate(self) -> float | None:
        return self.success_rate

    # What the engine answers when asked once more before a restart (still_hung):
    # None = as `health` says; a state = it answers so now (the recheck's verdict).
    recheck: EngineState | None = None
    rechecks = 0

    async def still_hung(self) -> bool:
        self.rechecks += 1
        if self.recheck is not None:
            self.set(self.recheck, "answered the recheck")
        return self.health.state is EngineState.HUNG

    def set(self, state: EngineState, reason: str = "test", **fields: Any) -> None:
        old = self.health
        self.health = EngineHealth(state, reason, self.clock(), **fields)
        if old.state is not state:
            for listener in self._listeners:
                listener(old, self.health)


class FakePeers:
    """Peer agents' answers, set by the test."""

    def __init__(self) -> None:
        self.statuses: dict[str, AgentStatus | None] = {}
        self.acks: dict[str, bool] = {}
        # api_url -> the peer's Ha, for calls that must reach its logic (negotiate)
        self.agents: dict[str, Any] = {}

    async def status(self, api_url: str) -> AgentStatus | None:
        return self.statuses.get(api_url)

    async def failsafe_ack(self, api_url: str, node: str, epoch: int) -> bool:
        return self.acks.get(api_url, False)

    async def close(self) -> None:
        return None

    async def post(
        self, api_url: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        ha = self.agents.get(api_url)
        if ha is None:
            return 0, {"detail": "no answer"}
        if path == "/ha/negotiate":
            granted, detail = ha.answer_failback(body["node"], body["epoch"])
            return (200 if granted else 409), {"granted": granted, "detail": detail}
        return 404, {"detail": "unknown path"}


def agent_status(
    node: str = "peer",
    role: Role = Role.STANDBY,
    engine: EngineState = EngineState.HEALTHY,
    epoch: int = 1,
    **fields: Any,
) -> AgentStatus:
    """An agent's /ha/status as a test wants it: only what the test is about."""
    engine_fields = {k: fields.pop(k) for k in ("for_seconds", "queued") if k in fields}
    return AgentStatus(
        node=node, role=role, epoch=epoch, engine=EngineStatus(engine, **engine_fields), **fields
    )


def settled_topology(settings: RelaySettings, primary: str = "sglang-01") -> Topology:
    """The relay's view of its seed nodes once every agent has answered: all healthy,
    `primary` holding epoch 1 (no store or agent polling needed)."""
    topology = Topology(settings, FakeStore(FakeClock()), EventLog(None, "relay"))
    for name, node in topology.nodes.items():
        node.status = agent_status(name, Role.PRIMARY if name == primary else Role.STANDBY)
    topology.primary, topology.epoch = primary, 1
    return topology


def relay_over(urls: Sequence[str], retry_deadline: float = 5.0, **settings: Any) -> Relay:
    """A relay in front of the engines at `urls` (sglang-01, sglang-02, ...), its
    topology settled: no store, no agents."""
    relay_settings = RelaySettings(
        nodes=[f"sglang-0{i + 1}={u}=http://127.0.0.1:9" for i, u in enumerate(urls)],
        redis_url="redis://unused",
        retry_deadline=retry_deadline,
        **settings,
    )
    topology = settled_topology(relay_settings)
    transport = Transport(
        0.5, 30.0, relay_settings.engine_headers(), relay_settings.engine_admin_headers()
    )
    return Relay(relay_settings, topology, transport, RelayMetrics(), topology.events)
