"""What the relay checks before and after an engine sees a request: the one hook for
limits.py (too heavy), shedding.py (primary saturated) and quarantine.py (query of
death), so relay.py calls two methods and knows none of the rules."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ha_agent import events as ev
from ha_agent.config import RelaySettings
from ha_agent.dcs.base import EngineState
from ha_agent.events import EventLog
from ha_agent.gateway.admission.limits import Limits, LimitSettings, ask_context_length
from ha_agent.gateway.admission.prompt_scan import PromptScanner
from ha_agent.gateway.admission.quarantine import Quarantine, fingerprint, node_died
from ha_agent.gateway.admission.shedding import Shedder
from ha_agent.gateway.errors import refusal_at
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import FailureCause, Transport, UpstreamFailure

log = logging.getLogger(__name__)


class Ticket:
    """An admitted generation request; its fingerprint is computed only when needed."""

    __slots__ = ("_fp", "kind", "payload", "suspects")

    def __init__(self, kind: str, payload: dict[str, Any]) -> None:
        self.kind, self.payload = kind, payload
        self._fp: str | None = None
        # Nodes this very request was on when they failed, each with the judgement
        # whether the node really stopped serving.
        self.suspects: list[tuple[str, asyncio.Future[bool]]] = []

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.kind, self.payload)
        return self._fp


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
        self.shedder = Shedder(parts.topology, settings.shed_queue_bound, settings.shed_retry_after)
        self.quarantine = Quarantine(settings.quarantine_ttl, shared=settings.quarantine_dir)
        self.topology, self.transport = parts.topology, parts.transport
        self.metrics, self.events = parts.metrics, parts.events
        self.confirm_s = 5.0  # a dead engine shows in its agent's status well within this

    def scanner(self, kind: str) -> PromptScanner | None:
        """For reading the body of a generation request: refuses a prompt too long
        for the context while it arrives (None: nothing to scan for)."""
        return self.limits.scanner(kind)

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
                    "this request is quarantined: the nodes that held it failed twice"
                    f" (a query of death); refused for another {left:.0f}s",
                )
        shed = self.shedder.check()
        if shed is not None:
            self.metrics.refused.labels(kind, "shed").inc()
            return refusal_at(path, shed.status, shed.message, shed.headers)
        request[_KEY] = ticket
        return None

    async def node_failed(
        self, request: web.Request, node: str, failure: UpstreamFailure
    ) -> str | None:
        """An attempt failed. When the request's second node died holding it, the
        reason to stop re-sending it; else None (re-send as usual).

        A broken connection is only a *suspected* crash (a stream can break for other
        reasons, and a migration re-sends it): it counts once the topology has seen
        that node stop serving (its agent reports the engine dead, hung or starting,
        or stops answering) within `confirm_s`. The first failure is judged in the
        background, so a plain failover re-sends at once; only a second one waits.
        """
        ticket: Ticket | None = request.get(_KEY)
        if ticket is None or not node_died(failure):
            return None
        judged = asyncio.ensure_future(self._confirm(node, failure.cause))
        # Other nodes that failed while holding this same request. Per request, not per
        # fingerprint across requests: identical prompts from many clients, on nodes
        # that died for unrelated reasons minutes apart, are no query of death.
        earlier = [
            f for other, f in ticket.suspects if other != node and (not f.done() or f.result())
        ]
        ticket.suspects.append((node, judged))
        if not earlier or not await judged:
            return None
        if not any(await asyncio.gather(*earlier)):
            return None
        fp = ticket.fingerprint
        self.quarantine.hold(fp)
        self.metrics.quarantined.inc()
        self.events.emit(
            ev.QUERY_QUARANTINED,
            f"{ticket.kind} request {fp[:12]}: {node} failed holding it, the second node"
            f" to; refused for {self.quarantine.ttl:.0f}s",
        )
        log.warning("quarantined request %s after %s failed holding it", fp, node)
        return (
            "this request is quarantined: the two nodes that held it both failed"
            f" (a query of death); refused for {self.quarantine.ttl:.0f}s"
        )

    async def _confirm(self, name: str, cause: FailureCause) -> bool:
        """Did the node stop serving (not just drop one connection)?"""
        if cause is FailureCause.ABANDONED:
            return True  # the topology already judged the node failed
        deadline = time.monotonic() + self.confirm_s
        while time.monotonic() < deadline:
            node = self.topology.nodes.get(name)
            if node is None or node.failed or node.engine_state is not EngineState.HEALTHY:
                return True
            await asyncio.sleep(0.05)
        return False
