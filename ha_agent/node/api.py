"""The agent's REST API: plain 200/503 answers any load balancer can use.

Health routes (no auth; they reveal nothing secret):
    GET /health      200 while the engine is healthy, whatever the role
    GET /primary     200 only on the primary with a certainly-valid lease
    GET /replica     200 on a healthy standby
    GET /liveness    200 while the HA loop is turning
    GET /readiness   200 while the engine can take requests
    GET /ha/status   role, epoch, lease time left, engine health, last transition
    GET /ha/history  the HA events from the store
    GET /metrics     Prometheus
    GET /openapi.json  this API in OpenAPI 3 (ha_agent/openapi/agent.py)
Admin routes (Bearer token):
    POST /ha/switchover {"to"?}   planned hand-over; refused unless a target is healthy
    POST /ha/failover {"to", "force": true}   for when the primary is gone
    POST /ha/pause, /ha/resume    keep roles, suspend automatic actions
    POST /ha/failsafe             a primary that lost the store asks for our ack
    POST /ha/negotiate {"node", "epoch"}   a recovered node asks for the role back
                                  (failback=negotiated); granted only if we are degraded
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ha_agent.auth import TokenAuth
from ha_agent.dcs.base import DCSError, Switchover
from ha_agent.events import FAILOVER_FORCED, SWITCHOVER_REQUESTED
from ha_agent.httpjson import error, json_errors, optional_str, read_object
from ha_agent.node.ha import Ha
from ha_agent.node.metrics import AgentMetrics
from ha_agent.openapi.agent import AGENT_SPEC


def _plain(ok: bool, detail: str) -> web.Response:
    return web.json_response({"ok": ok, "detail": detail}, status=200 if ok else 503)


class AgentApi:
    def __init__(self, ha: Ha, metrics: AgentMetrics, auth: TokenAuth) -> None:
        self.ha = ha
        self.metrics = metrics
        self.auth = auth

    def app(self) -> web.Application:
        app = web.Application(client_max_size=65536, middlewares=[json_errors])
        r = app.router
        r.add_get("/health", self.get_health)
        r.add_get("/primary", self.get_primary)
        r.add_get("/leader", self.get_primary)
        r.add_get("/replica", self.get_replica)
        r.add_get("/standby", self.get_replica)
        r.add_get("/liveness", self.get_liveness)
        r.add_get("/readiness", self.get_readiness)
        r.add_get("/ha/status", self.get_status)
        r.add_get("/ha/history", self.get_history)
        r.add_get("/metrics", self.get_metrics)
        r.add_get("/openapi.json", self.get_openapi)
        # Every state-changing route needs the token (tests/unit/test_api_agent.py).
        r.add_post("/ha/switchover", self.auth.required(self.post_switchover))
        r.add_post("/ha/failover", self.auth.required(self.post_failover))
        r.add_post("/ha/pause", self.auth.required(self.post_pause))
        r.add_post("/ha/resume", self.auth.required(self.post_resume))
        r.add_post("/ha/failsafe", self.auth.required(self.post_failsafe))
        r.add_post("/ha/negotiate", self.auth.required(self.post_negotiate))
        return app

    # -- health --------------------------------------------------------------------------

    async def get_health(self, request: web.Request) -> web.Response:
        h = self.ha.engine_health
        return _plain(h.healthy, f"engine {h.state.value}: {h.reason}")

    async def get_primary(self, request: web.Request) -> web.Response:
        ok = self.ha.is_primary()
        return _plain(ok, "primary" if ok else f"not primary ({self.ha.status().role.value})")

    async def get_replica(self, request: web.Request) -> web.Response:
        ok = self.ha.is_standby()
        return _plain(
            ok,
            "healthy standby" if ok else f"not a healthy standby ({self.ha.status().role.value})",
        )

    async def get_liveness(self, request: web.Request) -> web.Response:
        age = self.ha.clock() - self.ha.last_cycle_at
        limit = 3 * self.ha.s.loop_wait + 2 * self.ha.s.retry_timeout
        return _plain(age <= limit, f"last HA cycle {age:.2f}s ago (limit {limit:.2f}s)")

    async def get_readiness(self, request: web.Request) -> web.Response:
        h = self.ha.engine_health
        return _plain(h.healthy, f"engine {h.state.value}")

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.ha.status().to_json())

    async def get_history(self, request: web.Request) -> web.Response:
        try:
            count = min(max(int(request.query.get("count", "100")), 1), 10000)
        except ValueError:
            return error(400, "count must be an integer")
        try:
            rows = await self.ha.dcs.history(count)
        except DCSError as exc:
            return error(503, f"history unavailable: {exc}")
        return web.json_response(
            [{"ts": e.ts, "event": e.event, "node": e.node, "detail": e.detail} for e in rows]
        )

    async def get_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(AGENT_SPEC)

    # -- admin ---------------------------------------------------------------------------

    async def post_switchover(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        target = optional_str(body, "to")
        try:
            cluster = await self.ha.dcs.get_cluster()
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        if cluster.leader is None:
            return error(409, "there is no primary to switch over from; use failover")
        leader = cluster.leader.node
        if target == leader:
            return error(409, f"{target} is already the primary")
        candidates = [m for m in cluster.members if m.name != leader]
        if target is not None:
            candidates = [m for m in candidates if m.name == target]
            if not candidates:
                return error(404, f"unknown node {target!r}")
        healthy = []
        for member in candidates:
            status = await self.ha.peers.status(member.api_url)
            if status and status.engine.healthy:
                healthy.append(member.name)
        if not healthy:
            who = target or "any standby"
            return error(412, f"refused: {who} is not healthy; the primary keeps the lease")
        chosen = target or healthy[0]
        switch = Switchover(from_node=leader, to_node=chosen, requested_at=time.time())
        try:
            await self.ha.dcs.request_switchover(switch, self.ha.s.switchover_ttl)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        self.ha.events.emit(SWITCHOVER_REQUESTED, f"from {leader} to {chosen} (by admin)")
        if request.query.get("wait", "true") != "false":
            done = await self._wait_for_leader(chosen, timeout=self.ha.s.handover_wait)
            if not done:
                return web.json_response(
                    {"detail": f"switchover from {leader} to {chosen} requested, not yet done"},
                    status=202,
                )
        return web.json_response({"detail": f"switched over from {leader} to {chosen}"})

    async def post_failover(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        target = optional_str(body, "to")
        if target is None:
            return error(400, "failover needs 'to': the node to promote")
        if body.get("force") is not True:
            return error(400, 'failover drops the current lease; confirm with "force": true')
        try:
            cluster = await self.ha.dcs.get_cluster()
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        member = cluster.member(target)
        if member is None:
            return error(404, f"unknown node {target!r}")
        status = await self.ha.peers.status(member.api_url)
        if not status or not status.engine.healthy:
            return error(412, f"refused: {target} is not healthy")
        previous = cluster.leader.node if cluster.leader else None
        try:
            await self.ha.dcs.request_switchover(
                Switchover(from_node=previous or "", to_node=target, requested_at=time.time()),
                self.ha.s.switchover_ttl,
            )
            epoch = await self.ha.dcs.force_release()
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        self.ha.events.emit(FAILOVER_FORCED, f"from {previous} to {target} (epoch now > {epoch})")
        done = await self._wait_for_leader(target, timeout=self.ha.s.handover_wait)
        status_code = 200 if done else 202
        return web.json_response(
            {
                "detail": f"forced failover from {previous} to {target}"
                + ("" if done else " requested")
            },
            status=status_code,
        )

    async def post_pause(self, request: web.Request) -> web.Response:
        return await self._set_paused(True)

    async def post_resume(self, request: web.Request) -> web.Response:
        return await self._set_paused(False)

    async def _set_paused(self, paused: bool) -> web.Response:
        try:
            await self.ha.dcs.set_paused(paused)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        self.ha.wake.set()
        return web.json_response({"paused": paused})

    async def post_failsafe(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        leader = optional_str(body, "leader")
        epoch = body.get("epoch")
        if leader is None or not isinstance(epoch, int) or isinstance(epoch, bool):
            return error(400, "failsafe needs 'leader' (string) and 'epoch' (integer)")
        if self.ha.acknowledge_failsafe(leader, epoch):
            return web.json_response({"ack": True})
        return web.json_response({"ack": False}, status=409)

    async def post_negotiate(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        node = optional_str(body, "node")
        epoch = body.get("epoch")
        if node is None or not isinstance(epoch, int) or isinstance(epoch, bool):
            return error(400, "negotiate needs 'node' (string) and 'epoch' (integer)")
        granted, detail = self.ha.answer_failback(node, epoch)
        return web.json_response(
            {"granted": granted, "detail": detail}, status=200 if granted else 409
        )

    async def _wait_for_leader(self, node: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                cluster = await self.ha.dcs.get_cluster()
                if cluster.leader is not None and cluster.leader.node == node:
                    return True
            except DCSError:
                pass
            await asyncio.sleep(0.2)
        return False
