"""What the relay checks before and after an engine sees a request: the one hook for
limits.py (too heavy), shedding.py (primary saturated) and quarantine.py (query of
death), so relay.py calls two methods and knows none of the rules."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ha_agent import events as ev
from ha_agent.config import RelaySettings
from ha_agent.events import EventLog
from ha_agent.gateway.limits import Limits, LimitSettings, error_response
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.quarantine import Quarantine, fingerprint, node_died
from ha_agent.gateway.shedding import Shedder
from ha_agent.gateway.topology import Topology
from ha_agent.gateway.transport import UpstreamFailure

log = logging.getLogger(__name__)
_KEY = "sglang_ha_admitted"  # the request's Ticket, kept on the aiohttp request


class Ticket:
    """An admitted generation request; its fingerprint is computed only when needed."""

    __slots__ = ("_fp", "kind", "payload")

    def __init__(self, kind: str, payload: dict[str, Any]) -> None:
        self.kind, self.payload = kind, payload
        self._fp: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.kind, self.payload)
        return self._fp


class Admission:
    def __init__(
        self,
        settings: RelaySettings,
        topology: Topology,
        metrics: RelayMetrics,
        events: EventLog,
    ) -> None:
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
        self.shedder = Shedder(topology, settings.shed_queue_bound, settings.shed_retry_after)
        self.quarantine = Quarantine(settings.quarantine_ttl)
        self.metrics = metrics
        self.events = events

    def admit(
        self, request: web.Request, kind: str, payload: dict[str, Any]
    ) -> web.Response | None:
        """The refusal to answer at once, or None to send the request on."""
        path = request.path
        why = self.limits.check(kind, payload)
        if why is not None:
            self.metrics.refused.labels(kind, "limits").inc()
            return error_response(path, 400, why)
        ticket = Ticket(kind, payload)
        if self.quarantine:  # hash prompts only once something is under watch
            left = self.quarantine.held(ticket.fingerprint)
            if left > 0:
                self.metrics.refused.labels(kind, "quarantined").inc()
                return error_response(
                    path,
                    503,
                    "this request is quarantined: the nodes that held it failed twice"
                    f" (a query of death); refused for another {left:.0f}s",
                )
        shed = self.shedder.check()
        if shed is not None:
            self.metrics.refused.labels(kind, "shed").inc()
            return error_response(path, shed.status, shed.message, shed.headers)
        request[_KEY] = ticket
        return None

    def node_failed(self, request: web.Request, node: str, failure: UpstreamFailure) -> str | None:
        """An attempt failed. When its node died holding the request for the second
        time, the reason to stop re-sending it; else None (re-send as usual)."""
        ticket: Ticket | None = request.get(_KEY)
        if ticket is None or not node_died(failure.reason, failure.connect):
            return None
        fp = ticket.fingerprint
        if not self.quarantine.node_failed(fp, node):
            return None
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
