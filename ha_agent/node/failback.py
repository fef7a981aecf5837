"""Failback policy: when (if ever) a recovered node gets the primary role back.

Kept out of ha.py's cycle so that the cycle reads as one decision per path; the
cycle asks this module two questions — "should this standby ask for the lease
back now?" and "is a hand-back due from this primary?" — and the agent API asks a
third: "is this primary degraded enough to agree?" (the article's /ha/negotiate).
Every hand-back is a planned switchover, never a failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ha_agent.config import FailbackSettings
from ha_agent.dcs.base import Member
from ha_agent.node.engine.monitor import EngineHealth


@dataclass
class Handover:
    to_node: str
    at: float  # monotonic time the switchover may start


class Failback:
    def __init__(
        self, settings: FailbackSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.s = settings
        self.clock = clock
        self.lost_primary_at: float | None = None  # we lost the role to a failure
        self._next_ask = 0.0
        self._refusals = 0
        self.pending: Handover | None = None  # primary side: a granted hand-back

    # -- standby side (negotiated) ----------------------------------------------------

    def note_lost_primary(self) -> None:
        self.lost_primary_at = self.clock()
        self._refusals = 0
        self._next_ask = 0.0

    def should_negotiate(self, health: EngineHealth, held_back: float) -> bool:
        """A recovered former primary, healthy and quiet for the settle period."""
        if self.s.failback != "negotiated" or self.lost_primary_at is None:
            return False
        now = self.clock()
        healthy_for = now - health.since if health.healthy else 0.0
        return healthy_for >= self.s.failback_settle and held_back <= 0 and now >= self._next_ask

    def negotiated(self, granted: bool) -> None:
        if granted:
            self.lost_primary_at = None
            return
        # Ask again later, less and less often: the primary said it is fine.
        self._refusals += 1
        self._next_ask = self.clock() + min(self.s.failback_settle * 2**self._refusals, 600.0)

    # -- primary side ------------------------------------------------------------------

    def degradation(self, health: EngineHealth, success_rate: float | None) -> list[str]:
        """Why this primary is degraded (empty: it is not)."""
        s = self.s
        reasons = []
        if health.queued >= s.degraded_queue:
            reasons.append(f"queue {health.queued:.0f} >= {s.degraded_queue}")
        if success_rate is not None and success_rate < s.degraded_success_rate:
            reasons.append(
                f"canary success rate {success_rate:.2f} < {s.degraded_success_rate:.2f}"
            )
        if health.token_usage >= s.degraded_token_usage:
            reasons.append(
                f"KV-cache usage {health.token_usage:.2f} >= {s.degraded_token_usage:.2f}"
            )
        if not health.healthy:
            reasons.append(f"engine {health.state.value}")
        return reasons

    def grant(self, node: str) -> Handover:
        self.pending = Handover(node, self.clock() + self.s.failback_grace)
        return self.pending

    def due_handover(self) -> str | None:
        if self.pending is not None and self.clock() >= self.pending.at:
            node, self.pending = self.pending.to_node, None
            return node
        return None

    def preferred(self, me: str, priority: int, members: dict[str, Member]) -> str | None:
        """The node failback=preferred returns to, if it is not us."""
        if self.s.failback != "preferred":
            return None
        if self.s.preferred_node:
            return self.s.preferred_node if self.s.preferred_node != me else None
        ranked = sorted(
            [(priority, me)] + [(m.priority, m.name) for m in members.values() if m.name != me],
            key=lambda item: (-item[0], item[1]),
        )
        best = ranked[0][1]
        return best if best != me and ranked[0][0] > priority else None
