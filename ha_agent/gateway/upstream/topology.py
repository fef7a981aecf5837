"""The relay's view of the cluster: who is primary, which nodes can serve.

Two sources, so that neither is a single point of failure:
- the store (Redis via Sentinel): the lease holder and its fencing epoch, plus the
  node registry; watched through its notification channel and polled;
- each node's agent (/ha/status), polled: engine health, role, reachability.

The epoch only goes up: a leader read under an older epoch than one already seen
(a Redis failover lost the latest write) is never routed to as primary.

A node is *failed* when its agent stops answering or reports an unhealthy engine.
Requests in flight on a failed node are abandoned and re-sent elsewhere (see
relay.py); a connect error only keeps new requests off the node for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ha_agent import events as ev
from ha_agent.config import DynamicConfig, HaMode, RelaySettings
from ha_agent.dcs.base import (
    AgentStatus,
    Cluster,
    DCSError,
    EngineState,
    LeaseStore,
    NodeRemoved,
    Role,
)
from ha_agent.events import EventLog
from ha_agent.gateway.upstream.affinity import Affinity, PrefixRouter
from ha_agent.resolver import CachingResolver

log = logging.getLogger(__name__)

# Consecutive unanswered agent polls before a node counts as failed (NIC down,
# container frozen). Three polls ride out an agent restart by supervisord.
AGENT_MISSES_TO_FAIL = 3
# A node absent from the registry this long (many registry TTLs) is forgotten.
REMOVE_AFTER = 300.0
# After a connect error, new requests avoid the node for this long.
CONNECT_COOLDOWN = 1.0


class Abandonable:
    """Something in flight on a node that must stop if the node fails."""

    # When it was sent to the node (the topology's clock); None: not known. The wait
    # estimate reads it: requests sent together leave their slots together.
    since: float | None = None
    # A stream: its first event back marks when the engine gave it a slot (`began`,
    # the topology's clock; None while nothing came back: queued, or in its prefill).
    # The time it sat in the engine's queue is no progress through its decode.
    stream: bool = False
    began: float | None = None
    # The completion tokens it may still take: its request's budget, less what a moved
    # stream had generated before (None: not known). The wait estimate times each
    # request by its own budget: a 16-token answer in a slot frees it far sooner than
    # a 2,000-token generation.
    budget: int | None = None

    def abandon(self, reason: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class NodeView:
    name: str
    engine_url: str
    agent_url: str
    status: AgentStatus | None = None
    agent_misses: int = 0
    connect_failed_until: float = 0.0
    failed: bool = False
    failed_reason: str = ""
    inflight: set[Abandonable] = field(default_factory=set)
    seed: bool = False  # from HA_NODES: kept even when it is not registered
    registered_at: float = 0.0  # monotonic, when the registry last listed it
    # When a poll last showed the agent's count of engine runs ended by the engine's
    # own exception go up (monotonic; -inf: never): the query-of-death rule's input.
    exception_seen_at: float = float("-inf")
    exceptions_seen: int | None = None  # that count, as last polled

    @property
    def engine_state(self) -> EngineState | None:
        """As its agent last reported it; None while it has not."""
        return self.status.engine.state if self.status is not None else None

    @property
    def out_of_service(self) -> bool:
        """A pool node its agent keeps out of service (rejoin damping) though healthy."""
        return self.status is not None and self.status.mode == "pool" and not self.status.serving

    def can_serve(self, now: float) -> bool:
        return (
            not self.failed
            and self.engine_state is EngineState.HEALTHY
            and not self.out_of_service
            and now >= self.connect_failed_until
        )


def _queued(node: NodeView) -> bool:
    """Its engine has requests waiting, as its agent last reported."""
    return node.status is not None and node.status.engine.queued > 0


def parse_seed(item: str) -> NodeView:
    """`name=engine_url=agent_url` (from HA_NODES)."""
    parts = item.split("=")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"node seed {item!r} is not name=engine_url=agent_url")
    return NodeView(name=parts[0], engine_url=parts[1].rstrip("/"), agent_url=parts[2].rstrip("/"))


class Topology:
    def __init__(
        self,
        settings: RelaySettings,
        store: LeaseStore,
        events: EventLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s = settings
        self.store = store
        self.events = events
        self.clock = clock
        self.nodes: dict[str, NodeView] = {}
        for item in settings.nodes:
            node = parse_seed(item)
            node.seed = True
            self.nodes[node.name] = node
        self.primary: str | None = None
        self.epoch = 0
        self.degraded = False
        self.last_refresh = 0.0
        self.changes = asyncio.Event()  # set whenever primary or failures change
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self.leader_changes = 0
        # The cluster-wide dynamic settings (sglang-ha edit-config), as last read;
        # observers apply them (the warming rate) without a restart.
        self.config: DynamicConfig | None = DynamicConfig()
        self.config_observers: list[Callable[[DynamicConfig], None]] = []
        self.pool = settings.mode is HaMode.POOL
        self.router = PrefixRouter(settings.affinity_load_factor, settings.affinity_load_slack)

    # -- what the relay asks -------------------------------------------------------------

    def routing_order(
        self,
        exclude: set[str] | frozenset[str] = frozenset(),
        affinity: Affinity | None = None,
    ) -> list[NodeView]:
        """Nodes to try, best first. Pair: the primary, then healthy standbys, then
        the rest as a last resort (better a try than a certain 503). Pool: the
        serving nodes by prefix affinity within the load bound (affinity.py), then
        the rest as a last resort."""
        now = self.clock()
        candidates = [n for n in self.nodes.values() if n.name not in exclude]
        if self.pool:
            return self._pool_order(candidates, affinity, now)
        primary = self.nodes.get(self.primary) if self.primary else None

        def rank(node: NodeView) -> tuple[int, int, str]:
            if node.can_serve(now):
                tier = 0 if node is primary else 1
            elif not node.failed and now >= node.connect_failed_until:
                tier = 2 if node is primary else 3  # unknown health: not proven bad
            else:
                tier = 4
            return (tier, len(node.inflight), node.name)

        return sorted(candidates, key=rank)

    def _pool_order(
        self, candidates: list[NodeView], affinity: Affinity | None, now: float
    ) -> list[NodeView]:
        serving = {n.name: n for n in candidates if n.can_serve(now)}
        ranked = self.router.order(
            affinity,
            list(serving),
            lambda name: len(serving[name].inflight),
            ring_nodes=sorted(self.nodes),
            queued=lambda name: _queued(serving[name]),
        )

        def rank(node: NodeView) -> tuple[int, int, str]:
            if node.failed or now < node.connect_failed_until:
                tier = 2
            elif node.engine_state is EngineState.HEALTHY:
                tier = 0  # out of service while it proves stable: better than unknown
            else:
                tier = 1  # unknown health: not proven bad
            return (tier, len(node.inflight), node.name)

        rest = sorted((n for n in candidates if n.name not in serving), key=rank)
        return [serving[name] for name in ranked] + rest

    def sent(self, node: NodeView, affinity: Affinity | None) -> None:
        """A request (or its continuation) went to `node`: its prefix is cached there."""
        if self.pool:
            self.router.learn(affinity, node.name)

    def connect_failed(self, node: NodeView) -> None:
        node.connect_failed_until = self.clock() + CONNECT_COOLDOWN

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "mode": self.s.mode.value,
            "primary": self.primary,
            "epoch": self.epoch,
            "degraded": self.degraded,
            "last_refresh_age": round(now - self.last_refresh, 2),
            "nodes": [
                {
                    "name": n.name,
                    "engine_url": n.engine_url,
                    "agent_url": n.agent_url,
                    "engine": n.engine_state.value if n.engine_state else "unknown",
                    "role": n.status.role.value if n.status else None,
                    "failed": n.failed,
                    "failed_reason": n.failed_reason,
                    "can_serve": n.can_serve(now),
                    "serving": bool(n.status and n.status.serving),
                    "inflight": len(n.inflight),
                }
                for n in self.nodes.values()
            ],
        }

    # -- refresh -------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = min(self.s.poll_interval * 0.8, 1.0)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=16, use_dns_cache=False, resolver=CachingResolver()
                ),
                timeout=aiohttp.ClientTimeout(total=timeout, connect=timeout),
            )
        return self._session

    async def refresh(self) -> None:
        cluster: Cluster | None
        try:
            cluster = await self.store.get_cluster()
        except DCSError as exc:
            cluster = None
            if not self.degraded:
                self.degraded = True
                self.events.emit(
                    ev.DEGRADED_MODE_ENTERED,
                    f"relay: store unreachable ({exc}); routing on own view",
                )
        if cluster is not None:
            if self.degraded:
                self.degraded = False
                self.events.emit(ev.DEGRADED_MODE_EXITED, "relay: store reachable again")
            self._merge_members(cluster)
            self._apply_config(cluster.config)
        await self._poll_agents()
        self._judge_failures()
        self._choose_primary(cluster)
        self.last_refresh = self.clock()

    def _merge_members(self, cluster: Cluster) -> None:
        now = self.clock()
        for m in cluster.members:
            node = self.nodes.get(m.name)
            if node is None:
                node = self.nodes[m.name] = NodeView(
                    m.name, m.engine_url.rstrip("/"), m.api_url.rstrip("/")
                )
                log.info("discovered node %s at %s", m.name, m.engine_url)
            else:
                node.engine_url, node.agent_url = m.engine_url.rstrip("/"), m.api_url.rstrip("/")
            node.registered_at = now
        # A node that left the registry long ago (decommissioned) leaves the view once
        # nothing runs on it; a dead node's entry only lapses after REMOVE_AFTER.
        for name, node in list(self.nodes.items()):
            gone_for = now - node.registered_at
            if not node.seed and gone_for > REMOVE_AFTER and not node.inflight:
                del self.nodes[name]
                self.events.emit(ev.NODE_REMOVED, f"{name}: not registered for {gone_for:.0f}s")
                self.changes.set()

    def _apply_config(self, config: DynamicConfig | None) -> None:
        if config is None or config == self.config:
            return
        log.info(
            "dynamic config: %s",
            ", ".join(f"{k}={v}" for k, v in config.values().items()) or "none set",
        )
        self.config = config
        for observe in self.config_observers:
            observe(config)

    def forget(self, name: str) -> None:
        """A node was decommissioned (sglang-ha remove): drop it now, seed or not."""
        if self.nodes.pop(name, None) is not None:
            self.events.emit(ev.NODE_REMOVED, f"{name}: removed from the cluster")
            self.changes.set()

    async def _poll_agents(self) -> None:
        async def poll(node: NodeView) -> None:
            try:
                async with self._http().get(f"{node.agent_url}/ha/status") as resp:
                    if resp.status != 200:
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                    self.took_status(node, AgentStatus.from_json(await resp.json()))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                node.agent_misses += 1

        await asyncio.gather(*(poll(n) for n in list(self.nodes.values())))

    def took_status(self, node: NodeView, status: AgentStatus) -> None:
        """An agent's answer to a poll."""
        node.status, node.agent_misses = status, 0
        count = status.engine.exceptions
        # The first answer only teaches the count; a lower one is a restarted agent.
        if node.exceptions_seen is not None and count > node.exceptions_seen:
            node.exception_seen_at = self.clock()
        node.exceptions_seen = count

    def _judge_failures(self) -> None:
        for node in self.nodes.values():
            if node.agent_misses >= AGENT_MISSES_TO_FAIL:
                reason = f"agent unreachable ({node.agent_misses} polls)"
                node.status = None
            elif node.engine_state in (EngineState.HUNG, EngineState.DEAD):
                reason = f"engine {node.engine_state.value}"
            else:
                reason = ""
            if reason and not node.failed:
                node.failed, node.failed_reason = True, reason
                self.events.emit(ev.NODE_UNREACHABLE, f"{node.name}: {reason}")
                self._abandon(node, reason)
                self.changes.set()
            elif not reason and node.failed and node.engine_state is EngineState.HEALTHY:
                node.failed, node.failed_reason = False, ""
                self.events.emit(ev.NODE_REACHABLE, f"{node.name}: engine healthy")
                self.changes.set()

    def _abandon(self, node: NodeView, reason: str) -> None:
        for item in list(node.inflight):
            item.abandon(f"{node.name} failed: {reason}")

    def _choose_primary(self, cluster: Cluster | None) -> None:
        primary: str | None = None
        epoch = self.epoch
        if cluster is not None and cluster.leader is not None:
            leader = cluster.leader
            if leader.epoch >= self.epoch:
                primary, epoch = leader.node, leader.epoch
            else:
                log.warning(
                    "store names %s under epoch %d < %d already seen: not routing to it as primary",
                    leader.node,
                    leader.epoch,
                    self.epoch,
                )
        if primary is None and (cluster is None or cluster.leader is not None):
            # Store away or stale: trust an agent that claims the lease at the newest epoch.
            claims = [
                (n.status.epoch, n.name)
                for n in self.nodes.values()
                if n.status and n.status.role is Role.PRIMARY and not n.failed
            ]
            claims = [c for c in claims if c[0] >= self.epoch]
            if claims:
                epoch, primary = max(claims)
            elif cluster is None and self.primary and self.nodes.get(self.primary):
                keep = self.nodes[self.primary]
                primary = self.primary if not keep.failed else None
        if primary != self.primary:
            previous = self.primary
            self.primary = primary
            self.leader_changes += 1
            self.events.emit(
                ev.LEADER_CHANGED, f"from {previous or '-'} to {primary or '-'} (epoch {epoch})"
            )
            self.changes.set()
        self.epoch = max(self.epoch, epoch)

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        watcher = asyncio.ensure_future(self._follow_notifications(stop))
        try:
            while not stop.is_set():
                started = self.clock()
                try:
                    await self.refresh()
                except Exception:
                    log.exception("BUG: topology refresh failed")
                self._wake.clear()
                delay = max(self.s.poll_interval - (self.clock() - started), 0.0)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if self._session is not None:
                await self._session.close()

    async def _follow_notifications(self, stop: asyncio.Event) -> None:
        async for message in self.store.watch():
            removed = NodeRemoved.decode(message)
            if removed is not None:
                self.forget(removed.node)
            self._wake.set()
            if stop.is_set():
                return
