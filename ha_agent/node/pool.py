"""Pool mode: whether this node serves.

In a pool every node whose engine is healthy takes traffic; the lease only names the
coordinator (docs/architecture.md, "Pool mode"). So serving is decided here, from
the engine's health alone, never from the store: a Redis outage changes nothing.

- Out of service at once: the moment the engine monitor judges the engine anything
  but healthy (the same judgement, and so the same detection time, as a primary's
  demotion in the pair). `serving()` is computed at call time, like `/primary`.
- Back in service only after damping: the engine healthy for `pool_rejoin_stable`
  and the node no longer held back by flap damping (`damping.py`, the rule that
  keeps a flapping node from the lease in the pair). A node that never served yet
  (agent start) serves as soon as its engine is healthy, as a pair's first node
  takes a free lease at once.
"""

from __future__ import annotations

from collections.abc import Callable

from ha_agent import events as ev
from ha_agent.config import AgentSettings
from ha_agent.events import EventLog
from ha_agent.node.damping import FlapDamper
from ha_agent.node.engine.monitor import EngineHealth


class PoolMembership:
    def __init__(
        self,
        settings: AgentSettings,
        damper: FlapDamper,
        events: EventLog,
        clock: Callable[[], float],
    ) -> None:
        self.s = settings
        self.name = settings.node_name
        self.damper = damper
        self.events = events
        self.clock = clock
        self.in_service = False  # as last decided; `serving()` also checks the engine
        self.ever_served = False
        self.out_reason = ""

    def serving(self, health: EngineHealth) -> bool:
        """Whether new requests may come here now."""
        return self.in_service and health.healthy

    def rejoin_in(self, health: EngineHealth) -> float:
        """Seconds before a node out of service may serve again (0: now)."""
        if not self.ever_served:
            return 0.0
        stable_left = self.s.pool_rejoin_stable - (self.clock() - health.since)
        return max(stable_left, self.damper.held_back_for(), 0.0)

    def engine_changed(self, health: EngineHealth) -> None:
        """Out of service the moment the engine is not healthy (the listener's call)."""
        if self.in_service and not health.healthy:
            self.in_service = False
            self.out_reason = f"engine {health.state.value}: {health.reason}"
            self.events.emit(ev.NODE_OUT_OF_SERVICE, f"{self.name}: {self.out_reason}")

    def decide(self, health: EngineHealth) -> str:
        """One cycle's decision; the sentence the cycle logs about serving."""
        self.engine_changed(health)
        if self.in_service:
            return "serving"
        if not health.healthy:
            return f"out of service: engine {health.state.value} ({health.reason})"
        wait = self.rejoin_in(health)
        if wait > 0:
            return f"out of service; rejoining in {wait:.1f}s if the engine stays healthy"
        first = not self.ever_served
        self.in_service = self.ever_served = True
        self.out_reason = ""
        if first:
            self.events.emit(ev.NODE_SERVING, f"{self.name}: engine healthy")
            return "serving: joined the pool"
        self.events.emit(ev.NODE_REJOINED, f"{self.name}: engine healthy and stable")
        return "serving: rejoined the pool"
