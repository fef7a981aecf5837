"""The coordination store, as the agents and the relay see it, and the values that
cross between components.

One snapshot type (`Cluster`) and one abstract store (`LeaseStore`). The only
implementation in use is Redis through Sentinel (`redis_sentinel.py`); the
abstraction keeps the HA state machine testable with a fake. `AgentStatus` is an
agent's own answer (`/ha/status`): built by the agent, parsed once by whoever reads it
(peers, the relay, the CLI), so that no reader picks fields out of a dict.
"""

from __future__ import annotations

import abc
import enum
import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, TypeVar, get_args

from ha_agent.config import DynamicConfig, FailbackPolicy


class DCSError(Exception):
    """The store could not be reached or did not answer in time."""


@dataclass(frozen=True)
class Leader:
    """Who holds the lease, under which fencing epoch, for how much longer."""

    node: str
    epoch: int
    ttl_ms: int

    @property
    def token(self) -> str:
        return lease_token(self.epoch, self.node)


def lease_token(epoch: int, node: str) -> str:
    return f"{epoch}:{node}"


def parse_token(raw: str) -> tuple[int, str]:
    epoch, _, node = raw.partition(":")
    return int(epoch), node


class Role(str, enum.Enum):
    """A node's role. FENCED: it still believes it is primary, but its lease may
    have lapsed, so it serves nothing as primary until it renews."""

    PRIMARY = "primary"
    STANDBY = "standby"
    FENCED = "fenced"


class EngineState(str, enum.Enum):
    """How an agent judges its engine (monitor.py decides which)."""

    STARTING = "starting"
    HEALTHY = "healthy"
    HUNG = "hung"
    DEAD = "dead"


R = TypeVar("R", bound="StoredRecord")


class StoredRecord:
    """A dataclass kept in the store as compact JSON. Fields the reader does not
    know (written by a newer agent) are ignored, so a rolling upgrade can add some."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[R], raw: str | bytes) -> R:
        data = json.loads(raw)
        fields = cls.__dataclass_fields__  # type: ignore[attr-defined]
        return cls(**{k: data[k] for k in fields if k in data})


@dataclass(frozen=True)
class Member(StoredRecord):
    """A node as it registered itself: where its engine and agent answer."""

    name: str
    engine_url: str
    api_url: str
    role: Role = Role.STANDBY
    epoch: int = 0
    engine_health: EngineState = EngineState.STARTING
    priority: int = 0
    updated: float = field(default_factory=time.time)
    # Whether the node takes new requests: the primary in a pair, every node in
    # service in a pool. Absent in what older agents wrote: read as False.
    serving: bool = False

    def __post_init__(self) -> None:
        # Stored as the enums' string values (what older agents wrote too); the JSON
        # reader hands those back, and an unknown one raises ValueError.
        object.__setattr__(self, "role", Role(self.role))
        object.__setattr__(self, "engine_health", EngineState(self.engine_health))


@dataclass(frozen=True)
class Switchover(StoredRecord):
    """A planned hand-over the current primary should carry out."""

    from_node: str
    to_node: str | None
    requested_at: float


@dataclass(frozen=True)
class Cluster:
    """One consistent-enough read of the store, taken once per HA cycle."""

    leader: Leader | None
    members: tuple[Member, ...] = ()
    max_epoch: int = 0
    paused: bool = False
    switchover: Switchover | None = None
    # The cluster-wide dynamic settings; None when the stored value is unreadable
    # (readers then keep what they applied last).
    config: DynamicConfig | None = field(default_factory=DynamicConfig)

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True)
class HAEvent:
    """One line of the HA history."""

    ts: float
    event: str
    node: str
    detail: str = ""

    def to_fields(self) -> dict[str, str]:
        return {
            "ts": f"{self.ts:.3f}",
            "event": self.event,
            "node": self.node,
            "detail": self.detail,
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> HAEvent:
        return cls(
            ts=float(fields.get("ts", 0)),
            event=str(fields.get("event", "")),
            node=str(fields.get("node", "")),
            detail=str(fields.get("detail", "")),
        )


@dataclass(frozen=True)
class Transition:
    """A node's last change of role, as its agent reports it."""

    at: float  # wall clock, for humans
    what: str

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "what": self.what}

    @classmethod
    def from_json(cls, data: Any) -> Transition:
        if not isinstance(data, Mapping):
            raise ValueError("last transition is not an object")
        return cls(at=_num(data, "at"), what=str(data.get("what", "")))


@dataclass(frozen=True)
class NodeRemoved:
    """The notice on the leader channel that a node was deregistered: watchers
    (agents, relays) stop treating it as a peer at once, not when its entry expires.
    On the wire: "removed <node>"."""

    node: str

    prefix: ClassVar[str] = "removed "

    def encode(self) -> str:
        return self.prefix + self.node

    @classmethod
    def decode(cls, message: str) -> NodeRemoved | None:
        """The notice in `message`, or None if the message says something else."""
        if not message.startswith(cls.prefix):
            return None
        return cls(message.removeprefix(cls.prefix))


def _num(data: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} is not a number: {value!r}")
    return float(value)


@dataclass(frozen=True)
class EngineStatus:
    """How an agent judges its engine, as it reports it."""

    state: EngineState
    reason: str = ""
    for_seconds: float = 0.0
    oom: bool = False
    # Engine runs that ended in the engine's own exception since the agent started
    # (process.py EXCEPTION_TEXT): what the relay's query-of-death rule reads.
    exceptions: int = 0
    # Down, and the agent has read how the run ended for good: `exceptions` will not
    # rise for this death (false where it cannot know, e.g. from a container's logs).
    exit_known: bool = False
    running: float = 0.0
    queued: float = 0.0
    token_usage: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.state is EngineState.HEALTHY

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_json(cls, data: Any) -> EngineStatus:
        if not isinstance(data, Mapping):
            raise ValueError("engine status is not an object")
        return cls(
            state=EngineState(data.get("state")),
            reason=str(data.get("reason", "")),
            for_seconds=_num(data, "for_seconds"),
            oom=bool(data.get("oom", False)),
            exceptions=int(_num(data, "exceptions")),
            exit_known=bool(data.get("exit_known", False)),
            running=_num(data, "running"),
            queued=_num(data, "queued"),
            token_usage=_num(data, "token_usage"),
        )


@dataclass(frozen=True)
class AgentStatus:
    """An agent's answer to /ha/status. `from_json` raises ValueError on anything
    that is not one, so a reader either has all of it or treats the agent as mute."""

    node: str
    role: Role
    epoch: int
    engine: EngineStatus
    leader: str | None = None
    lease_time_left: float = 0.0
    engine_url: str = ""
    api_url: str = ""
    degraded: bool = False
    paused: bool = False
    priority: int = 0
    failback: FailbackPolicy = "never"
    held_back_for: float = 0.0
    last_transition: Transition | None = None
    last_cycle: str = ""
    last_cycle_age: float = 0.0
    lease_ttl: float = 0.0  # in effect on this agent (edit-config changes it live)
    loop_wait: float = 0.0
    engine_restarts: int = 0  # automatic restarts of a hung engine, in the window
    engine_restart: str = ""  # why the agent does or does not restart a hung engine
    mode: str = "pair"  # HA_MODE of this agent
    # Takes new requests now: the primary in a pair, a node in service in a pool.
    serving: bool = False
    pool: str = ""  # pool mode: the serving decision, in words

    @property
    def is_primary(self) -> bool:
        """Primary with a lease it can still count on."""
        return self.role is Role.PRIMARY and self.lease_time_left > 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(role=self.role.value, engine=self.engine.to_json())
        data["last_transition"] = self.last_transition.to_json() if self.last_transition else None
        return data

    @classmethod
    def from_json(cls, data: Any) -> AgentStatus:
        if not isinstance(data, Mapping):
            raise ValueError("agent status is not an object")
        epoch = data.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise ValueError(f"'epoch' is not an integer: {epoch!r}")
        leader = data.get("leader")
        transition = data.get("last_transition")
        failback = data.get("failback", "never")
        if failback not in get_args(FailbackPolicy):
            raise ValueError(f"'failback' is not a failback policy: {failback!r}")
        return cls(
            node=str(data.get("node", "")),
            role=Role(data.get("role")),
            epoch=epoch,
            engine=EngineStatus.from_json(data.get("engine")),
            leader=str(leader) if leader is not None else None,
            lease_time_left=_num(data, "lease_time_left"),
            engine_url=str(data.get("engine_url", "")),
            api_url=str(data.get("api_url", "")),
            degraded=bool(data.get("degraded", False)),
            paused=bool(data.get("paused", False)),
            priority=int(_num(data, "priority")),
            failback=failback,
            held_back_for=_num(data, "held_back_for"),
            last_transition=Transition.from_json(transition) if transition is not None else None,
            last_cycle=str(data.get("last_cycle", "")),
            last_cycle_age=_num(data, "last_cycle_age"),
            lease_ttl=_num(data, "lease_ttl"),
            loop_wait=_num(data, "loop_wait"),
            engine_restarts=int(_num(data, "engine_restarts")),
            engine_restart=str(data.get("engine_restart", "")),
            mode=str(data.get("mode", "pair")),
            serving=bool(data.get("serving", False)),
            pool=str(data.get("pool", "")),
        )


class LeaseStore(abc.ABC):
    """Leader lease with a monotonic fencing epoch, plus a small registry."""

    @abc.abstractmethod
    async def get_cluster(self) -> Cluster: ...

    @abc.abstractmethod
    async def acquire(self, node: str, ttl: float, min_epoch: int) -> int | None:
        """Take the lease if free; return the new epoch, or None if someone holds it."""

    @abc.abstractmethod
    async def renew(self, node: str, epoch: int, ttl: float) -> bool:
        """Extend the lease if (and only if) we still hold it under this epoch."""

    @abc.abstractmethod
    async def release(self, node: str, epoch: int) -> bool:
        """Give the lease up if we hold it; wake the watchers."""

    @abc.abstractmethod
    async def force_release(self) -> int:
        """Drop whoever holds the lease and bump the epoch so the old holder cannot
        renew it back (forced failover). Returns the bumped epoch."""

    @abc.abstractmethod
    async def register(self, member: Member, ttl: float) -> None: ...

    @abc.abstractmethod
    async def forget(self, name: str) -> None:
        """Drop a node from the registry (decommissioned) and tell the watchers."""

    @abc.abstractmethod
    async def get_config(self) -> DynamicConfig:
        """The cluster-wide dynamic settings (empty if none were set). Raises
        ValueError if the stored value is not a valid DynamicConfig."""

    @abc.abstractmethod
    async def set_config(self, config: DynamicConfig, previous: DynamicConfig) -> bool:
        """Store `config` if the stored one is still `previous` (compare-and-set, so
        two editors cannot silently undo each other); wake the watchers. False: it
        changed meanwhile, nothing was written."""

    @abc.abstractmethod
    async def set_paused(self, paused: bool) -> None: ...

    @abc.abstractmethod
    async def request_switchover(self, switchover: Switchover, ttl: float) -> None: ...

    @abc.abstractmethod
    async def clear_switchover(self) -> None: ...

    @abc.abstractmethod
    async def append_event(self, event: HAEvent) -> None: ...

    @abc.abstractmethod
    async def history(self, count: int = 100) -> list[HAEvent]: ...

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[str]:
        """Yield a short message whenever the lease changes hands (best effort)."""

    @abc.abstractmethod
    async def close(self) -> None: ...
