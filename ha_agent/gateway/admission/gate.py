"""What the relay checks before and after an engine sees a request: the one hook for
limits.py (too heavy), shedding.py (primary saturated), wait.py (expected queue wait
past the bound) and quarantine.py (query of death), so relay.py calls a few methods
and knows none of the rules."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ha_agent import events as ev
from ha_agent.config import HaMode, RelaySettings
from ha_agent.events import EventLog
from ha_agent.gateway.admission.limits import Limits, LimitSettings, ask_context_length
from ha_agent.gateway.admission.prompt_scan import PromptScanner
from ha_agent.gateway.admission.quarantine import (
    Cause,
    Held,
    Quarantine,
    Solo,
    crash_cause,
    fingerprint,
    node_died,
)
from ha_agent.gateway.admission.shedding import Shedder
from ha_agent.gateway.admission.wait import (
    Estimate,
    WaitCollector,
    WaitEstimator,
    all_serving,
    first_serving,
)
from ha_agent.gateway.errors import refusal_at
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import Transport, UpstreamFailure
from ha_agent.openapi.endpoints import generation

log = logging.getLogger(__name__)

# The budget of a request without one while the context is unknown (SGLang's default
# context for many models).
UNBOUNDED_BUDGET = 32768


class Ticket:
    """An admitted generation request; its fingerprint is computed only when needed."""

    __slots__ = (
        "_fp",
        "alive",
        "attempts",
        "budget",
        "crashed",
        "free_on",
        "kind",
        "past_bound",
        "payload",
        "sent_at",
        "solo",
        "suspect_since",
    )

    def __init__(self, kind: str, payload: dict[str, Any]) -> None:
        self.kind, self.payload = kind, payload
        self._fp: str | None = None
        self.sent_at = 0.0  # when the current attempt went out (monotonic)
        # Nodes whose engine crashed of its own exception while this request was on
        # it, before it had received anything from it (quarantine.py: a suspect).
        self.crashed: list[str] = []
        self.suspect_since = 0.0
        self.solo: Held | None = None  # the one-suspect-at-a-time slot, while held
        # The nodes that had a slot free for it at admission (a first attempt on one
        # of them waited for nothing: a clean service time), and the attempts made.
        self.free_on: frozenset[str] = frozenset()
        # The candidates whose wait was past the bound at admission: its first attempt
        # goes elsewhere while another can serve (wait.py `Survey.past`).
        self.past_bound: frozenset[str] = frozenset()
        self.attempts = 0
        self.alive = False  # counted in Admission.alive until done
        self.budget = 0  # completion tokens it may take (wait.py)

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.kind, self.payload)
        return self._fp

    def release(self) -> None:
        if self.solo is not None:
            self.solo.release()
            self.solo = None


_KEY = web.RequestKey("sglang_ha_admitted", Ticket)  # the request's Ticket


@dataclass(frozen=True)
class RelayParts:
    """What a relay worker is built from, and hands to the helpers it runs (admission)."""

    settings: RelaySettings
    topology: Topology
    transport: Transport
    metrics: RelayMetrics
    events: EventLog


class Admission:
    def __init__(self, parts: RelayParts) -> None:
        settings = parts.settings
        self.limits = Limits(
            LimitSettings(
                context_length=settings.context_length,
                chars_per_token=settings.prompt_chars_per_token,
                constraint_max_bytes=settings.constraint_max_bytes,
                constraint_max_depth=settings.constraint_max_depth,
                regex_max_repeat=settings.regex_max_repeat,
                warm_max_chars=settings.warm_max_chars,
            )
        )
        pool = settings.mode is HaMode.POOL
        self.shedder = Shedder(
            parts.topology, settings.shed_queue_bound, settings.shed_retry_after, pool=pool
        )
        # A pool sheds by wait only when every serving node is past the bound.
        self.wait = WaitEstimator(
            parts.topology, settings.shed_wait_bound, all_serving if pool else first_serving
        )
        # Admitted requests of this worker not yet done, wherever they are: on a node,
        # or between two attempts (re-sent after a failure, held while the cause of a
        # crash is found): those land on a serving node next (wait.py).
        self.alive = 0
        self.alive_budget = 0  # their completion budgets, summed
        self.wait.in_transit = self._in_transit
        self.wait.workers = max(settings.relay_workers, 1)  # 0: not resolved, one process
        self.wait.queue_budget = lambda: self.alive_budget / self.alive if self.alive else None
        self.retry_floor = settings.shed_retry_after
        # One event line per episode of refusals by wait, from one worker (each has
        # its own share of the requests; worker 0 already speaks for the topology).
        self.episode = _Episode(parts.events, settings.relay_worker_index == 0)
        parts.metrics.add_collector(WaitCollector(self.wait))
        self.quarantine = Quarantine(settings.quarantine_ttl, shared=settings.quarantine_dir)
        self.solo = Solo(settings.quarantine_dir)
        self.suspect_wait = settings.quarantine_suspect_wait
        self.topology, self.transport = parts.topology, parts.transport
        self.metrics, self.events = parts.metrics, parts.events
        self.confirm_s = 5.0  # a dead engine shows in its agent's status well within this

    def scanner(self, kind: str, length: int | None = None) -> PromptScanner | None:
        """For reading the body of a generation request: refuses a prompt too long
        for the context while it arrives (None: nothing to scan for). `length`: the
        body's Content-Length, when it has one."""
        return self.limits.scanner(kind, length)

    def refuse_long(self, request: web.Request, scanner: PromptScanner) -> web.Response:
        """The answer to a prompt the scanner found too long: as `admit`'s."""
        self.metrics.refused.labels(scanner.kind, "limits").inc()
        return refusal_at(request.path, 400, self.limits.too_long(scanner))

    async def admit(
        self, request: web.Request, kind: str, payload: dict[str, Any]
    ) -> web.Response | None:
        """The refusal to answer at once, or None to send the request on."""
        path = request.path
        if self.limits.must_learn_first(kind, payload):
            await ask_context_length(self.limits, self.topology, self.transport, timeout=2.0)
        why = self.limits.check(kind, payload)
        if why is not None:
            self.metrics.refused.labels(kind, "limits").inc()
            return refusal_at(path, 400, why)
        ticket = Ticket(kind, payload)
        if self.quarantine:  # hash prompts only once something is under watch
            left = self.quarantine.held(ticket.fingerprint)
            if left > 0:
                self.metrics.refused.labels(kind, "quarantined").inc()
                return refusal_at(
                    path,
                    503,
                    "this request is quarantined: engines crashed of their own exception"
                    " with it twice, the second time with no other suspect on the engine"
                    f" (a query of death); refused for another {left:.0f}s",
                )
        shed = self.shedder.check()
        if shed is not None:
            self.metrics.refused.labels(kind, "shed").inc()
            return refusal_at(path, shed.status, shed.message, shed.headers)
        survey = self.wait.survey()
        best = survey.best
        if self.wait.refuses(best, survey.complete):
            assert best is not None
            retry = self.wait.retry_after(best, self.retry_floor)
            self.metrics.refused.labels(kind, "wait").inc()
            self.episode.shed(best, self.wait.bound)
            headers = {
                "Retry-After": str(retry),
                "retry-after-ms": str(self.wait.retry_after_ms(retry)),
            }
            return refusal_at(path, 429, _wait_message(best, self.wait.bound, retry), headers)
        self.episode.admitted()
        ticket.free_on, ticket.past_bound = survey.free, survey.past
        ticket.alive, ticket.budget = True, self._budget(kind, payload)
        self.alive += 1
        self.alive_budget += ticket.budget
        request[_KEY] = ticket
        return None

    async def attempt(self, request: web.Request) -> tuple[set[str], str | None]:
        """Before each upstream attempt: the nodes to avoid if another can serve, and
        a reason to stop instead (None: go on).

        A first attempt avoids the candidates that were past the wait bound when the
        request was admitted (a pool admits for the room of its least-wait node).
        A request that was a suspect of an engine's crash waits until at least two
        nodes serve (a second crash must leave one) and it holds the solo slot, so
        that a second crash with it on the engine can only be its doing.
        """
        ticket: Ticket | None = request.get(_KEY)
        if ticket is None:
            return set(), None
        if ticket.crashed:
            deadline = ticket.suspect_since + self.suspect_wait
            while not (ticket.solo is not None and self._enough_serving()):
                left = deadline - time.monotonic()
                if ticket.solo is None and left > 0 and self._enough_serving():
                    ticket.solo = await self.solo.acquire(left)
                    continue
                if left <= 0:
                    ticket.release()
                    self.metrics.refused.labels(ticket.kind, "suspect_wait").inc()
                    return set(), (
                        f"{', '.join(ticket.crashed)} crashed of the engine's own exception"
                        " while this request was starting there, and it could not be re-sent"
                        f" alone with another node serving within {self.suspect_wait:.0f}s;"
                        " it is not quarantined: retry it"
                    )
                await asyncio.sleep(0.05)
        ticket.sent_at = time.monotonic()
        avoid = set(ticket.crashed)
        if ticket.attempts == 0:
            # Admitted for the room another node has: it goes there, not to the prefix
            # home or the least-loaded node in flight if that one is past the bound.
            avoid |= ticket.past_bound
        ticket.attempts += 1
        return avoid, None

    def progressed(self, request: web.Request) -> None:
        """The request received its first event (or its answer): past its prefill, it is
        no suspect any more, and the next one may go."""
        ticket: Ticket | None = request.get(_KEY)
        if ticket is not None:
            ticket.crashed.clear()
            ticket.release()

    def served(self, request: web.Request, node: str, first_event_at: float | None = None) -> None:
        """A request was served whole by `node` (200, not moved): a service time
        sample when it measures one (wait.py). `first_event_at`: a stream's first
        event (monotonic); its decode lasted from there to now."""
        ticket: Ticket | None = request.get(_KEY)
        if ticket is None:
            return
        now = time.monotonic()
        if first_event_at is not None:
            self.wait.served(node, now - first_event_at, ticket.budget)
        elif node in ticket.free_on and ticket.attempts == 1:
            self.wait.served(node, now - ticket.sent_at, ticket.budget)

    def segment_served(
        self, request: web.Request, node: str, seconds: float, budget: int | None
    ) -> None:
        """A moved stream ended on `node`: its last segment's decode there (`seconds`
        from its first event) for the `budget` it had left, a service time sample."""
        if budget and request.get(_KEY) is not None:
            self.wait.served(node, seconds, budget)

    def budget(self, request: web.Request, left: int | None = None) -> int | None:
        """The completion tokens an attempt of `request` may take: its admitted budget,
        or `left` of it for a moved stream's continuation; None for a request that
        was not admitted as a generation."""
        ticket: Ticket | None = request.get(_KEY)
        if ticket is None:
            return None
        return ticket.budget if left is None else min(ticket.budget, left)

    def done(self, request: web.Request) -> None:
        """The request ended, however: give back what it holds."""
        self.progressed(request)
        ticket: Ticket | None = request.get(_KEY)
        if ticket is not None and ticket.alive:
            ticket.alive = False
            self.alive -= 1
            self.alive_budget -= ticket.budget

    def _budget(self, kind: str, payload: dict[str, Any]) -> int:
        """The completion tokens a request may take, as SGLang reads its budget; an
        unbounded one counts as the context."""
        route = generation(kind)
        budget = route.budget(payload) if route is not None else None
        context = self.limits.context_length or UNBOUNDED_BUDGET
        return min(budget, context) if budget and budget > 0 else context

    def _in_transit(self) -> int:
        """Admitted requests of this worker on no node right now (between attempts)."""
        on_nodes = sum(len(n.inflight) for n in self.topology.nodes.values())
        return max(0, self.alive - on_nodes)

    async def node_failed(
        self, request: web.Request, node: str, failure: UpstreamFailure, received: bool = False
    ) -> str | None:
        """An attempt failed. The reason to stop re-sending the request when it is
        the culprit of a query of death; else None (re-send as usual).

        `received`: the request had received an event from this node (a stream past its
        prefill there): not a suspect, whatever the cause. Otherwise the request waits
        for the cause (bounded by `confirm_s`): only the engine's own exception makes
        it a suspect (quarantine.py).
        """
        ticket: Ticket | None = request.get(_KEY)
        if ticket is None:
            return None
        if received or not node_died(failure):
            return None
        cause = await crash_cause(self.topology, node, ticket.sent_at, self.confirm_s)
        if cause is not Cause.EXCEPTION:
            log.info("%s failed holding a request (%s): re-sent", node, cause.value)
            return None
        # Alone on the engines as a suspect, and a suspect of an earlier crash too (of
        # the other node, as attempt() prefers; of the same one only in a one-node
        # cluster): no one else can have caused both.
        alone, earlier = ticket.solo is not None, list(ticket.crashed)
        if not ticket.crashed:
            ticket.suspect_since = time.monotonic()
        ticket.crashed.append(node)
        ticket.release()
        if not (alone and earlier):
            return None  # a suspect: re-sent alone once two nodes serve (attempt())
        fp = ticket.fingerprint
        self.quarantine.hold(fp)
        self.metrics.quarantined.inc()
        self.events.emit(
            ev.QUERY_QUARANTINED,
            f"{ticket.kind} request {fp[:12]}: {node}'s engine crashed of its own exception"
            f" with it alone under suspicion, after {', '.join(earlier)}'s did with it;"
            f" refused for {self.quarantine.ttl:.0f}s",
        )
        log.warning("quarantined request %s after %s crashed holding it alone", fp, node)
        return (
            "this request is quarantined: two engines crashed of their own exception with it"
            f" (a query of death); refused for {self.quarantine.ttl:.0f}s"
        )

    def _enough_serving(self) -> bool:
        now = self.topology.clock()
        nodes = self.topology.nodes.values()
        return sum(n.can_serve(now) for n in nodes) >= min(2, len(nodes))


def _wait_message(est: Estimate, bound: float, retry: int) -> str:
    q = est.queue
    return (
        f"the expected queue wait on {q.node} is {est.wait:.0f}s ({q.ahead} requests must"
        f" leave {q.slots} running slots first, {est.service:.1f}s each as measured),"
        f" over the bound of {bound:g}s; retry after {retry}s"
    )


class _Episode:
    """Refusals by expected wait as episodes: one event when they start, one when
    none came for `QUIET` seconds (told at the next admitted request), never one per
    request."""

    QUIET = 5.0

    def __init__(self, events: EventLog, emit: bool) -> None:
        self.events, self.emit = events, emit
        self.since: float | None = None
        self.last = 0.0
        self.count = 0

    def shed(self, est: Estimate, bound: float) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self.count = now, 0
            self._say(
                ev.SHEDDING_STARTED,
                f"new requests refused (429): expected queue wait on {est.node} {est.wait:.0f}s,"
                f" over the bound of {bound:g}s ({est.queue.outstanding} requests on"
                f" {est.queue.slots} running slots, {est.service:.1f}s each)",
            )
        self.count += 1
        self.last = now

    def admitted(self) -> None:
        if self.since is None:
            return
        now = time.monotonic()
        if now - self.last < self.QUIET:
            return
        self._say(
            ev.SHEDDING_STOPPED,
            f"expected queue wait back under the bound: {self.count} requests refused"
            f" over {self.last - self.since:.0f}s",
        )
        self.since = None

    def _say(self, event: str, detail: str) -> None:
        if self.emit:
            self.events.emit(event, detail)
        else:
            log.info("%s %s", event, detail)
