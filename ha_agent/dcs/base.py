"""The coordination store, as the agents and the relay see it.

One snapshot type (`Cluster`) and one abstract store (`LeaseStore`). The only
implementation in use is Redis through Sentinel (`redis_sentinel.py`); the
abstraction keeps the HA state machine testable with a fake.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class Member:
    """A node as it registered itself: where its engine and agent answer."""

    name: str
    engine_url: str
    api_url: str
    role: str = "standby"
    epoch: int = 0
    engine_health: str = "starting"
    priority: int = 0
    updated: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Member:
        data = json.loads(raw)
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class Switchover:
    """A planned hand-over the current primary should carry out."""

    from_node: str
    to_node: str | None
    requested_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Switchover:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Cluster:
    """One consistent-enough read of the store, taken once per HA cycle."""

    leader: Leader | None
    members: tuple[Member, ...] = ()
    max_epoch: int = 0
    paused: bool = False
    switchover: Switchover | None = None

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
