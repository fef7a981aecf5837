"""The node's HA state machine: one readable cycle, after Patroni's ha.py.

Every `loop_wait` (or sooner, when the lease changes hands or the engine's health
changes) `run_cycle()` reads one snapshot of the store and takes one small action:
renew, release, acquire, follow, or hold. Each path returns the sentence that the
agent logs for the cycle.

Safety rules, in the order the cycle applies them:
1. Self-fencing comes first and needs no store: a primary whose lease could have
   expired by now stops being primary (its /primary turns 503) *before* the store
   lets anyone else take the lease (`safety_margin`).
2. An unhealthy engine never holds or takes the lease.
3. A standby asks the last primary's agent before it takes a free lease: if that
   primary says it is alive with a valid lease (the key was lost in a Redis
   failover), the standby waits.
4. With the store away (degraded mode) nobody is promoted; the primary stays
   primary only while every peer acknowledges it (Patroni's failsafe mode).

In pool mode (HA_MODE=pool) the same cycle keeps the lease, which then names the
coordinator; whether this node serves is decided first, from the engine alone
(node/pool.py), so the store's state never stops a healthy node serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ha_agent import events as ev
from ha_agent.config import DYNAMIC_SETTINGS, AgentSettings, DynamicConfig, HaMode
from ha_agent.dcs.base import (
    AgentStatus,
    Cluster,
    DCSError,
    EngineState,
    HAEvent,
    LeaseStore,
    Member,
    Role,
    Switchover,
    Transition,
)
from ha_agent.events import EventLog
from ha_agent.node.arbiter import FileArbiter
from ha_agent.node.damping import FlapDamper
from ha_agent.node.engine.monitor import EngineHealth, HealthMonitor
from ha_agent.node.failback import Failback
from ha_agent.node.peers import PeerClient
from ha_agent.node.pool import PoolMembership

log = logging.getLogger(__name__)


@dataclass
class HAState:
    role: Role = Role.STANDBY
    epoch: int = 0  # the epoch we hold (primary) or last saw (standby)
    lease_valid_until: float = 0.0  # monotonic; meaningful while primary
    max_epoch_seen: int = 0
    leader: str | None = None  # who holds the lease, as last seen
    degraded: bool = False
    paused: bool = False
    handed_over_at: float = -1e9  # monotonic time of our last planned hand-over
    last_transition: Transition | None = None
    members: dict[str, Member] = field(default_factory=dict)  # as registered now
    # Every peer ever seen, kept when the store forgets them (e.g. Redis came back
    # empty): the standby must still be able to ask the old primary if it is alive.
    known_peers: dict[str, Member] = field(default_factory=dict)


class Refusal(enum.Enum):
    """Why the cluster's state refuses what an admin asked for."""

    NO_PRIMARY = "no primary"
    ALREADY_PRIMARY = "already primary"
    UNKNOWN_NODE = "unknown node"
    NOT_HEALTHY = "not healthy"
    IS_PRIMARY = "is the primary"
    STILL_RUNS = "agent still runs"
    CONFIG_CHANGED = "config changed meanwhile"


class Refused(Exception):
    """An admin request the cluster's state refuses; `detail` says why to a human."""

    def __init__(self, why: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.why = why
        self.detail = detail


@dataclass(frozen=True)
class Handover:
    """A hand-over of the lease requested: from whom (None: nobody held it) to whom."""

    from_node: str | None
    to_node: str


class Ha:
    def __init__(
        self,
        settings: AgentSettings,
        dcs: LeaseStore,
        engine: HealthMonitor,
        events: EventLog,
        peers: PeerClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env_settings = settings  # as started: what the dynamic config overrides
        self.s = settings  # in effect now
        # The dynamic config last seen in the store (None: it was unreadable).
        self.config: DynamicConfig | None = DynamicConfig()
        # Called with the new effective settings when the dynamic config changes them.
        self.settings_observers: list[Callable[[AgentSettings], None]] = []
        self.name = settings.node_name
        self.dcs = dcs
        self.engine = engine
        self.events = events
        self.peers = peers
        self.clock = clock
        self.state = HAState()
        self.damper = FlapDamper(clock=clock)
        # Pool mode: whether this node serves, decided from its engine alone; the
        # lease then names the coordinator, not the node that serves.
        self.pool = (
            PoolMembership(settings, self.damper, events, clock)
            if settings.mode is HaMode.POOL
            else None
        )
        self.failback = Failback(settings, clock=clock)
        self.arbiter = FileArbiter(settings.arbiter_file) if settings.arbiter_file else None
        self._preferred_checked_at = -1e9
        self._planned_restart_until = -1e9  # monotonic: an admin restarts the engine
        self.last_cycle_at = clock()
        self.last_cycle_message = "starting"
        self.pool_note = ""  # pool mode: the last serving decision, in words
        self._last_logged: str | None = None  # repeated cycle sentences log at debug
        self.wake = asyncio.Event()
        self.transitions_total = 0
        self.failovers_total = 0
        self.renew_latency: float | None = None
        # Called with each successful renewal's latency (the metrics' histogram).
        self.renew_observers: list[Callable[[float], None]] = []
        # Written by the engine restarter (node/engine_restart.py), shown in status.
        self.engine_restarts = 0
        self.engine_restart_note = ""
        engine.on_change(self._engine_changed)

    # -- what the API and metrics read -------------------------------------------------

    @property
    def engine_health(self) -> EngineHealth:
        return self.engine.health

    def lease_time_left(self) -> float:
        if self.state.role is not Role.PRIMARY:
            return 0.0
        return max(self.state.lease_valid_until - self.clock(), 0.0)

    def is_primary(self) -> bool:
        """True only while the lease is certainly ours and the engine can serve.

        Computed at call time, so an agent that was frozen and wakes up answers
        503 before its loop has even run again.
        """
        return (
            self.state.role is Role.PRIMARY
            and self.clock() < self.state.lease_valid_until
            and self.engine.health.healthy
        )

    def is_serving(self) -> bool:
        """Whether new requests may come here: the primary in a pair, a node in
        service in a pool. Computed at call time, as is_primary."""
        if self.pool is not None:
            return self.pool.serving(self.engine.health)
        return self.is_primary()

    def is_standby(self) -> bool:
        return not self.is_primary() and self.engine.health.healthy

    def advertised_engine_url(self) -> str:
        return self.s.advertise_engine_url or self.s.engine_url

    def advertised_api_url(self) -> str:
        return self.s.advertise_api_url or f"http://127.0.0.1:{self.s.api_port}"

    def status(self) -> AgentStatus:
        h = self.engine.health
        st = self.state
        if self.is_primary():
            role = Role.PRIMARY
        else:
            role = Role.FENCED if st.role is Role.PRIMARY else Role.STANDBY
        return AgentStatus(
            node=self.name,
            role=role,
            epoch=st.epoch,
            leader=st.leader,
            lease_time_left=round(self.lease_time_left(), 3),
            engine=h.status(self.clock()),
            engine_url=self.advertised_engine_url(),
            api_url=self.advertised_api_url(),
            degraded=st.degraded,
            paused=st.paused,
            priority=self.s.priority,
            failback=self.s.failback,
            held_back_for=round(self.damper.held_back_for(), 1),
            last_transition=st.last_transition,
            last_cycle=self.last_cycle_message,
            last_cycle_age=round(self.clock() - self.last_cycle_at, 2),
            lease_ttl=self.s.lease_ttl,
            loop_wait=self.s.loop_wait,
            engine_restarts=self.engine_restarts,
            engine_restart=self.engine_restart_note,
            mode=self.s.mode.value,
            serving=self.is_serving(),
            pool=self.pool_note,
        )

    # -- the cycle -----------------------------------------------------------------------

    async def run_cycle(self) -> str:
        try:
            message = await self._run_cycle()
        except Exception as exc:  # never let one bad cycle kill the agent
            log.exception("BUG: unexpected error in HA cycle")
            message = f"BUG: unexpected {type(exc).__name__} in HA cycle: {exc}"
        self.last_cycle_at = self.clock()
        self.last_cycle_message = message
        return message

    async def _run_cycle(self) -> str:
        if self.pool is None:
            return await self._lease_cycle()
        # Serving is decided before the store is read: an outage must not stop it.
        self.pool_note = self.pool.decide(self.engine.health)
        return f"{self.pool_note}; {await self._lease_cycle()}"

    async def _lease_cycle(self) -> str:
        fenced = self._self_fence()
        try:
            cluster = await self.dcs.get_cluster()
        except DCSError as exc:
            return await self.process_dcs_outage(exc, fenced)
        if self.state.degraded:
            self.state.degraded = False
            self.events.emit(ev.DEGRADED_MODE_EXITED, "coordination store reachable again")
        self._absorb(cluster)
        self.apply_config(cluster.config)
        await self._register()

        leader = cluster.leader
        mine = leader is not None and leader.node == self.name
        if self.state.role is Role.PRIMARY and (
            leader is None
            or (mine and leader.epoch == self.state.epoch)
            or leader.epoch < self.state.epoch
        ):
            # A missing key while we hold a valid lease was lost by the store (Redis
            # failover); an older epoch is a lease we superseded while the store was
            # away (arbiter). Renewing writes ours unless a newer epoch exists.
            return await self.process_leader(cluster)
        if mine:
            return await self.adopt_own_lease(cluster)
        if leader is not None:
            return await self.follow(cluster)
        return await self.process_no_leader(cluster)

    def _self_fence(self) -> str | None:
        st = self.state
        if st.role is Role.PRIMARY and self.clock() >= st.lease_valid_until:
            self._become(Role.STANDBY)
            why = "lease not renewed in time; stopped serving as primary before it could expire"
            self.failback.note_lost_primary()
            self.events.emit(ev.FENCED, f"{self.name} epoch {st.epoch}: {why}")
            return why
        return None

    def _absorb(self, cluster: Cluster) -> None:
        st = self.state
        st.max_epoch_seen = max(st.max_epoch_seen, cluster.max_epoch)
        if cluster.paused != st.paused:
            st.paused = cluster.paused
            self.events.emit(ev.PAUSED if st.paused else ev.RESUMED, "automatic actions")
        st.members = {m.name: m for m in cluster.members}
        st.known_peers.update(st.members)
        if cluster.leader is not None:
            st.leader = cluster.leader.node
            if st.role is not Role.PRIMARY:
                st.epoch = cluster.leader.epoch

    def apply_config(self, config: DynamicConfig | None) -> None:
        """Take the store's dynamic settings into effect, from this cycle on.

        The agent's API validated them before they were stored; a value that still
        does not fit this node (its environment differs) is logged and not applied:
        the node keeps the settings it had, never a silently adjusted variant."""
        if config is None:
            if self.config is not None:
                log.error(
                    "dynamic config in the store is unreadable; keeping the settings in effect"
                )
            self.config = None
            return
        if config == self.config:
            return
        self.config = config
        try:
            new = config.applied_to(self.env_settings)
        except ValueError as exc:
            log.error("dynamic config %s not applied here: %s", config.values(), exc)
            return
        changed = [
            f"{key} {getattr(self.s, key)} -> {getattr(new, key)}"
            for key in DYNAMIC_SETTINGS
            if key in AgentSettings.model_fields and getattr(self.s, key) != getattr(new, key)
        ]
        self.s = new
        self.failback.s = new
        for observe in self.settings_observers:
            observe(new)
        if changed:
            log.info("dynamic config applied: %s", ", ".join(changed))

    async def _register(self) -> None:
        h = self.engine.health
        me = Member(
            name=self.name,
            engine_url=self.advertised_engine_url(),
            api_url=self.advertised_api_url(),
            role=Role.PRIMARY if self.is_primary() else Role.STANDBY,
            epoch=self.state.epoch,
            engine_health=h.state,
            priority=self.s.priority,
            serving=self.is_serving(),
        )
        with contextlib.suppress(DCSError):
            await self.dcs.register(me, self.s.registry_ttl)

    # -- we hold the lease -------------------------------------------------------------

    async def process_leader(self, cluster: Cluster) -> str:
        st = self.state
        h = self.engine.health
        if not h.healthy and not st.paused:
            await self._release(f"engine {h.state.value}: {h.reason}")
            return f"demoted: engine {h.state.value} ({h.reason}); released the lease"
        switch = cluster.switchover
        if switch is not None and switch.from_node == self.name and not st.paused:
            target = await self.takeover_candidate(cluster, self.name, switch.to_node)
            if target is None:
                return await self._renew(
                    cluster, note="; switchover pending: no healthy target yet"
                )
            st.handed_over_at = self.clock()
            await self._release(f"planned switchover to {target}", planned=True)
            self.events.emit(ev.SWITCHOVER_REQUESTED, f"from {self.name} to {target}")
            return f"demoted: planned switchover to {target}; released the lease"
        # No failback in a pool: the lease names the coordinator, every node serves.
        if not st.paused and switch is None and self.pool is None:
            note = await self._failback_due(cluster)
            if note:
                return await self._renew(cluster, note=note)
        return await self._renew(cluster)

    async def _failback_due(self, cluster: Cluster) -> str | None:
        """Start a hand-back if one is due (negotiated grant, or preferred node back)."""
        target = self.failback.due_handover()
        why = "negotiated failback"
        if target is None:
            target = await self._preferred_node_ready()
            why = "failback to the preferred node"
        if target is None:
            return None
        await self.dcs.request_switchover(
            Switchover(self.name, target, time.time()), ttl=self.s.switchover_ttl
        )
        self.events.emit(ev.SWITCHOVER_REQUESTED, f"from {self.name} to {target} ({why})")
        self.wake.set()
        return f"; {why}: switchover to {target} requested"

    async def _preferred_node_ready(self) -> str | None:
        st = self.state
        preferred = self.failback.preferred(self.name, self.s.priority, st.members)
        member = st.members.get(preferred) if preferred else None
        now = self.clock()
        if member is None or now - self._preferred_checked_at < self.s.preferred_check_interval:
            return None
        self._preferred_checked_at = now
        status = await self.peers.status(member.api_url)
        ready = (
            status is not None
            and status.role is Role.STANDBY
            and status.engine.healthy
            and status.engine.for_seconds >= self.s.failback_stable
            and status.held_back_for <= 0
        )
        return member.name if ready else None

    async def _renew(self, cluster: Cluster, note: str = "") -> str:
        st = self.state
        started = self.clock()
        try:
            ok = await self.dcs.renew(self.name, st.epoch, self.s.lease_ttl)
        except DCSError as exc:
            self.events.emit(ev.LEASE_RENEW_FAILED, f"{self.name} epoch {st.epoch}: {exc}")
            return await self.process_dcs_outage(exc, None)
        self.renew_latency = self.clock() - started
        for observe in self.renew_observers:
            observe(self.renew_latency)
        if not ok:
            self._become(Role.STANDBY)
            self.events.emit(
                ev.LEASE_LOST, f"{self.name} epoch {st.epoch}: another holder or epoch"
            )
            self.events.emit(ev.DEMOTED, f"{self.name} to standby (lease lost)")
            return f"demoted: lease lost (epoch {st.epoch})"
        st.lease_valid_until = self.s.lease_deadline(started)
        paused = " (paused)" if st.paused else ""
        return f"renewed lease as primary (epoch {st.epoch}){paused}{note}"

    async def adopt_own_lease(self, cluster: Cluster) -> str:
        """The store names us but we are not acting as primary: agent restart, or we
        fenced ourselves over a slow store. Resume if healthy, else let it go."""
        assert cluster.leader is not None
        epoch = cluster.leader.epoch
        if not self.engine.health.healthy:
            with contextlib.suppress(DCSError):
                await self.dcs.release(self.name, epoch)
            return f"released a lease left under our name (epoch {epoch}): engine not healthy"
        started = self.clock()
        try:
            got = await self.dcs.acquire(self.name, self.s.lease_ttl, self.state.max_epoch_seen)
        except DCSError as exc:
            return await self.process_dcs_outage(exc, None)
        if got != epoch:
            return f"could not resume lease epoch {epoch} (store answered {got})"
        self.state.epoch = epoch
        self.state.lease_valid_until = self.s.lease_deadline(started)
        self._become(Role.PRIMARY)
        self.events.emit(ev.PROMOTED, f"{self.name} resumed as primary (epoch {epoch})")
        return f"resumed as primary under our existing lease (epoch {epoch})"

    async def _release(self, why: str, planned: bool = False) -> None:
        st = self.state
        epoch = st.epoch
        self._become(Role.STANDBY)
        if not planned:
            self.failback.note_lost_primary()
        try:
            released = await self.dcs.release(self.name, epoch)
        except DCSError as exc:
            released = False
            log.warning("could not release lease: %s (it will expire)", exc)
        self.events.emit(ev.DEMOTED, f"{self.name} to standby: {why}")
        if released:
            self.events.emit(ev.LEASE_RELEASED, f"{self.name} epoch {epoch}")

    # -- someone else holds the lease --------------------------------------------------

    async def follow(self, cluster: Cluster) -> str:
        assert cluster.leader is not None
        leader = cluster.leader
        st = self.state
        if st.role is Role.PRIMARY:
            self._become(Role.STANDBY)
            self.failback.note_lost_primary()
            self.events.emit(
                ev.LEASE_LOST, f"{self.name}: {leader.node} holds epoch {leader.epoch}"
            )
            self.events.emit(ev.DEMOTED, f"{self.name} to standby")
        h = self.engine.health
        sentence = (
            f"following {leader.node} (epoch {leader.epoch}) as standby; engine {h.state.value}"
        )
        if (
            self.pool is None
            and not st.paused
            and self.failback.should_negotiate(h, self.damper.held_back_for())
        ):
            sentence += "; " + await self._ask_for_failback(leader.node, leader.epoch)
        return sentence

    async def _ask_for_failback(self, leader: str, epoch: int) -> str:
        """Ask the primary to hand the role back (failback=negotiated)."""
        member = self.state.known_peers.get(leader)
        if member is None:
            return f"cannot negotiate: no address for {leader}"
        code, data = await self.peers.post(
            member.api_url, "/ha/negotiate", {"node": self.name, "epoch": epoch}
        )
        granted = code == 200 and data.get("granted") is True
        self.failback.negotiated(granted)
        detail = str(data.get("detail", ""))
        self.events.emit(
            ev.FAILBACK_GRANTED if granted else ev.FAILBACK_REFUSED,
            f"{leader} to {self.name}: {detail}",
        )
        return f"asked {leader} to hand back: {'granted' if granted else 'refused'} ({detail})"

    def answer_failback(self, node: str, epoch: int) -> tuple[bool, str]:
        """/ha/negotiate: agree to hand back only if we are degraded ourselves."""
        if not self.is_primary() or epoch != self.state.epoch:
            return False, f"{self.name} is not the primary under epoch {epoch}"
        if self.s.failback != "negotiated":
            return False, f"failback policy here is {self.s.failback!r}"
        if node not in self.state.members or node == self.name:
            return False, f"unknown node {node!r}"
        reasons = self.failback.degradation(self.engine.health, self.engine.recent_success_rate())
        if not reasons:
            return False, "the primary is not degraded"
        handover = self.failback.grant(node)
        grace = max(handover.at - self.clock(), 0.0)
        return True, f"planned switchover to {node} in {grace:.0f}s ({'; '.join(reasons)})"

    # -- nobody holds the lease --------------------------------------------------------

    async def process_no_leader(self, cluster: Cluster) -> str:
        st = self.state
        previous = st.leader
        h = self.engine.health
        if st.paused:
            return "no leader, but automatic actions are paused: not taking the lease"
        if not h.healthy:
            return f"no leader; not eligible: engine {h.state.value} ({h.reason})"
        held = self.damper.held_back_for()
        if held > 0 and self._other_healthy_member(exclude=previous):
            return f"no leader; held back {held:.1f}s more: engine health has been flapping"
        switch = cluster.switchover
        if switch is not None and switch.to_node not in (None, self.name):
            target = st.members.get(switch.to_node)
            if target is not None and target.engine_health is EngineState.HEALTHY:
                return f"no leader; planned switchover to {switch.to_node}: leaving it the lease"
        if self.clock() - st.handed_over_at < self.s.handover_grace and switch is not None:
            return "no leader; we just handed over: leaving the lease to the switchover target"
        if previous and previous != self.name:
            alive = await self._previous_primary_alive(previous)
            if alive:
                return (
                    f"no leader key, but {previous} says it is primary with a valid lease: waiting"
                )
        return await self._acquire(cluster, previous)

    async def _acquire(self, cluster: Cluster, previous: str | None) -> str:
        st = self.state
        planned = cluster.switchover is not None and cluster.switchover.to_node in (None, self.name)
        if previous and previous != self.name and not planned:
            self.events.emit(ev.FAILOVER_INITIATED, f"from {previous} to {self.name}")
        started = self.clock()
        try:
            epoch = await self.dcs.acquire(self.name, self.s.lease_ttl, st.max_epoch_seen)
        except DCSError as exc:
            return await self.process_dcs_outage(exc, None)
        if epoch is None:
            return "no leader, but another node took the lease first"
        st.epoch = epoch
        st.max_epoch_seen = max(st.max_epoch_seen, epoch)
        st.lease_valid_until = self.s.lease_deadline(started)
        st.leader = self.name
        self._become(Role.PRIMARY)
        self.events.emit(ev.LEASE_ACQUIRED, f"{self.name} epoch {epoch}")
        self.events.emit(ev.PROMOTED, f"{self.name} to primary (epoch {epoch})")
        if planned:
            with contextlib.suppress(DCSError):
                await self.dcs.clear_switchover()
            self.events.emit(ev.SWITCHOVER_COMPLETED, f"from {previous} to {self.name}")
            return f"promoted to primary (epoch {epoch}) by planned switchover from {previous}"
        if previous and previous != self.name:
            self.failovers_total += 1
            return f"promoted to primary (epoch {epoch}): failover from {previous}"
        return f"promoted to primary (epoch {epoch}): no leader was present"

    def _other_healthy_member(self, exclude: str | None = None) -> bool:
        """Another node that could lead now: registered recently with a healthy engine,
        and not the primary whose lease just lapsed (its entry outlives it)."""
        now = time.time()
        return any(
            m.engine_health is EngineState.HEALTHY and now - m.updated <= self.s.registration_fresh
            for name, m in self.state.members.items()
            if name not in (self.name, exclude)
        )

    async def _previous_primary_alive(self, previous: str) -> bool:
        member = self.state.known_peers.get(previous)
        if member is None:
            return False
        status = await self.peers.status(member.api_url)
        return bool(status and status.is_primary and status.epoch >= self.state.max_epoch_seen)

    async def takeover_candidate(
        self, cluster: Cluster, leaving: str | None, wanted: str | None
    ) -> str | None:
        """Who may take the lease over from `leaving`: `wanted` if named, else the
        first other registered node, whose agent answers with a healthy engine. The
        one rule for a switchover in the cycle and for the admin's switchover and
        failover alike. None: no node qualifies now."""
        candidates = [m for m in cluster.members if m.name != leaving]
        if wanted is not None:
            candidates = [m for m in candidates if m.name == wanted]
        for member in candidates:
            status = await self.peers.status(member.api_url)
            if status and status.engine.healthy:
                return member.name
        return None

    # -- what an admin asks for (node/api.py translates HTTP to these) -----------------

    async def switch_over(self, to: str | None) -> Handover:
        """Request a planned hand-over from the primary to `to` (any healthy standby
        if None). Raises Refused, or DCSError with the store away."""
        cluster = await self.dcs.get_cluster()
        if cluster.leader is None:
            raise Refused(
                Refusal.NO_PRIMARY, "there is no primary to switch over from; use failover"
            )
        leader = cluster.leader.node
        if to == leader:
            raise Refused(Refusal.ALREADY_PRIMARY, f"{to} is already the primary")
        if to is not None and cluster.member(to) is None:
            raise Refused(Refusal.UNKNOWN_NODE, f"unknown node {to!r}")
        chosen = await self.takeover_candidate(cluster, leader, to)
        if chosen is None:
            who = to or "any standby"
            raise Refused(
                Refusal.NOT_HEALTHY, f"refused: {who} is not healthy; the primary keeps the lease"
            )
        switch = Switchover(from_node=leader, to_node=chosen, requested_at=time.time())
        await self.dcs.request_switchover(switch, self.s.switchover_ttl)
        self.events.emit(ev.SWITCHOVER_REQUESTED, f"from {leader} to {chosen} (by admin)")
        return Handover(leader, chosen)

    async def fail_over(self, to: str) -> Handover:
        """Drop the current lease (whoever holds it) so that `to` takes it: for when
        the primary is gone. Raises Refused, or DCSError with the store away."""
        cluster = await self.dcs.get_cluster()
        if cluster.member(to) is None:
            raise Refused(Refusal.UNKNOWN_NODE, f"unknown node {to!r}")
        if await self.takeover_candidate(cluster, None, to) is None:
            raise Refused(Refusal.NOT_HEALTHY, f"refused: {to} is not healthy")
        previous = cluster.leader.node if cluster.leader else None
        await self.dcs.request_switchover(
            Switchover(from_node=previous or "", to_node=to, requested_at=time.time()),
            self.s.switchover_ttl,
        )
        epoch = await self.dcs.force_release()
        self.events.emit(ev.FAILOVER_FORCED, f"from {previous} to {to} (epoch now > {epoch})")
        return Handover(previous, to)

    async def history(self, count: int) -> list[HAEvent]:
        return await self.dcs.history(count)

    async def set_paused(self, paused: bool) -> None:
        """Suspend (or resume) automatic actions cluster-wide; this agent acts on it
        at once, the others at their next cycle or notification."""
        await self.dcs.set_paused(paused)
        self.wake.set()

    async def stored_config(self) -> DynamicConfig:
        """The dynamic settings as stored. Raises ValueError if they are not valid,
        DCSError with the store away."""
        return await self.dcs.get_config()

    async def edit_config(self, config: DynamicConfig, previous: DynamicConfig | None) -> list[str]:
        """Store `config` in place of `previous` (the stored value if None) and
        return the changes (empty: nothing to change, nothing written). Raises
        ValueError if it breaks this agent's rules, Refused if the stored value is no
        longer `previous`, DCSError with the store away."""
        # The rules are the agents' own: what could not be applied is not stored.
        config.applied_to(self.env_settings)
        try:
            current = await self.dcs.get_config()
        except ValueError:
            current = DynamicConfig()  # unreadable: a valid value may replace it
        previous = previous if previous is not None else current
        changes = previous.diff(config)
        if not changes:
            return []
        if not await self.dcs.set_config(config, previous):
            raise Refused(
                Refusal.CONFIG_CHANGED, "the config changed meanwhile; read it again and retry"
            )
        self.events.emit(ev.CONFIG_CHANGED, ", ".join(changes) + " (by admin)")
        self.wake.set()
        return changes

    def restart_engine_requested(self) -> None:
        """An admin restarts this node's engine now: not a flap, and in the history."""
        self.expect_engine_restart(self.s.startup_grace)
        self.events.emit(ev.ENGINE_RESTART_REQUESTED, f"{self.name} (by admin)")

    async def remove_node(self, node: str) -> None:
        """Deregister a stopped node. Raises Refused for the primary, an unknown node
        or one whose agent still answers (it would register again), DCSError with
        the store away."""
        cluster = await self.dcs.get_cluster()
        if cluster.leader is not None and cluster.leader.node == node:
            raise Refused(Refusal.IS_PRIMARY, f"{node} is the primary: switch over first")
        member = cluster.member(node) or self.state.known_peers.get(node)
        if member is None:
            raise Refused(Refusal.UNKNOWN_NODE, f"unknown node {node!r}")
        if node == self.name or await self.peers.status(member.api_url) is not None:
            raise Refused(
                Refusal.STILL_RUNS,
                f"{node}'s agent still runs (it would register again): stop it first",
            )
        await self.dcs.forget(node)
        # A removed node is no peer to ask for failsafe acks any more.
        self.state.known_peers.pop(node, None)
        self.state.members.pop(node, None)
        self.events.emit(ev.NODE_REMOVED, f"{node} (by admin)")

    async def wait_for_leader(self, node: str, timeout: float) -> bool:
        """Whether the store names `node` the leader within `timeout` s (real time:
        the admin's request waits on other agents, not on this one's clock)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                cluster = await self.dcs.get_cluster()
                if cluster.leader is not None and cluster.leader.node == node:
                    return True
            except DCSError:
                pass
            await asyncio.sleep(0.2)
        return False

    # -- the store is away -------------------------------------------------------------

    async def process_dcs_outage(self, exc: Exception, fenced: str | None) -> str:
        st = self.state
        if not st.degraded:
            st.degraded = True
            self.events.emit(ev.DEGRADED_MODE_ENTERED, f"coordination store unreachable: {exc}")
        if self.arbiter is not None:
            return self._arbitrate(fenced)
        if st.role is not Role.PRIMARY:
            prefix = f"fenced ({fenced}); " if fenced else ""
            return f"{prefix}store unreachable: staying standby, no promotion without the store"
        if not self.engine.health.healthy:
            self._become(Role.STANDBY)
            self.events.emit(
                ev.DEMOTED, f"{self.name} to standby: engine unhealthy, store unreachable"
            )
            return "store unreachable and engine unhealthy: stepped down"
        peers = [m for name, m in st.known_peers.items() if name != self.name]
        peer_urls = [m.api_url for m in peers] or self.s.peers
        started = self.clock()
        acks = await asyncio.gather(
            *(self.peers.failsafe_ack(url, self.name, st.epoch) for url in peer_urls)
        )
        if all(acks):
            st.lease_valid_until = self.s.lease_deadline(started)
            return (
                f"store unreachable: staying primary (epoch {st.epoch}),"
                f" {len(acks)} peer(s) acknowledged (failsafe)"
            )
        return (
            f"store unreachable and {acks.count(False)} peer(s) did not acknowledge:"
            f" fencing in {self.lease_time_left():.1f}s"
        )

    def _arbitrate(self, fenced: str | None) -> str:
        """Store away, arbiter file configured: its lock decides who is primary."""
        assert self.arbiter is not None
        st = self.state
        healthy = self.engine.health.healthy
        started = self.clock()
        if st.role is Role.PRIMARY or fenced:
            if healthy and self.arbiter.try_acquire():
                if st.role is not Role.PRIMARY:
                    self._become(Role.PRIMARY)
                st.lease_valid_until = self.s.lease_deadline(started)
                return (
                    f"store unreachable: staying primary (epoch {st.epoch}),"
                    " holding the arbiter lock"
                )
            self._become(Role.STANDBY)
            self.events.emit(
                ev.DEMOTED,
                f"{self.name} to standby: store unreachable, "
                + ("engine unhealthy" if not healthy else "arbiter lock held elsewhere"),
            )
            return "store unreachable: stepped down and released the arbiter lock"
        if not healthy or not self.arbiter.try_acquire():
            return "store unreachable: staying standby; the primary holds the arbiter lock"
        # The primary let go of the lock (stepped down or died): take over without Redis.
        previous = st.leader
        st.epoch = st.max_epoch_seen = st.max_epoch_seen + 1
        st.leader = self.name
        st.lease_valid_until = self.s.lease_deadline(started)
        self._become(Role.PRIMARY)
        self.failovers_total += 1
        self.events.emit(ev.FAILOVER_INITIATED, f"from {previous} to {self.name} (arbiter lock)")
        self.events.emit(ev.PROMOTED, f"{self.name} to primary (epoch {st.epoch}, arbiter lock)")
        return f"store unreachable: promoted to primary (epoch {st.epoch}) holding the arbiter lock"

    def acknowledge_failsafe(self, leader: str, epoch: int) -> bool:
        """A primary that lost the store asks us to confirm it may keep serving."""
        st = self.state
        if self.is_primary() or leader == self.name or epoch < st.max_epoch_seen:
            return False
        st.leader = leader
        return True

    # -- helpers -----------------------------------------------------------------------

    def _become(self, role: Role) -> None:
        st = self.state
        if st.role is role:
            return
        st.role = role
        if role is Role.STANDBY:
            st.lease_valid_until = 0.0
            if self.arbiter is not None:
                self.arbiter.release()
        elif self.arbiter is not None and not self.arbiter.try_acquire():
            log.warning(
                "arbiter lock %s is held elsewhere while we become primary", self.s.arbiter_file
            )
        self.transitions_total += 1
        st.last_transition = Transition(time.time(), f"became {role.value} (epoch {st.epoch})")

    def expect_engine_restart(self, within: float) -> None:
        """The engine is about to go down on purpose: its outage, until it is healthy
        again (or `within` s), does not count against the node's flap damping."""
        self._planned_restart_until = self.clock() + within

    def _engine_changed(self, old: EngineHealth, new: EngineHealth) -> None:
        if new.oom and not old.oom:
            self.events.emit(ev.ENGINE_OOM, f"{self.name}: {new.reason}")
        elif new.state is old.state is EngineState.DEAD:
            # How it died, told after the probe saw it dead (monitor._set).
            self.events.emit(ev.ENGINE_EXITED, f"{self.name}: {new.reason}")
        if new.state is old.state:
            return
        if new.state is EngineState.HEALTHY:
            self.events.emit(ev.ENGINE_HEALTHY, f"{self.name}: {new.reason}")
        elif old.state is EngineState.HEALTHY or new.state is EngineState.DEAD:
            self.events.emit(ev.ENGINE_UNHEALTHY, f"{self.name} {new.state.value}: {new.reason}")
        # A restart the operator asked for is not a flap.
        planned = self.clock() < self._planned_restart_until
        if (
            old.state is EngineState.HEALTHY
            and new.state is not EngineState.HEALTHY
            and not planned
        ):
            self.damper.record_failure()
        if new.state is EngineState.HEALTHY:
            self._planned_restart_until = -1e9
        if self.pool is not None:
            self.pool.engine_changed(new)
        self.wake.set()  # act on it now, not at the next tick

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = self.clock()
            message = await self.run_cycle()
            if message != self._last_logged:
                log.info("%s", message)
                self._last_logged = message
            else:
                log.debug("%s", message)
            self.wake.clear()
            delay = max(self.s.loop_wait - (self.clock() - started), 0.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(stop, self.wake), timeout=delay)


async def _first(*flags: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(f.wait()) for f in flags]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
