"""The agent's REST API: plain 200/503 answers any load balancer can use.

Health routes (no auth; they reveal nothing secret):
    GET /health      200 while the engine is healthy, whatever the role
    GET /primary     200 only on the primary with a certainly-valid lease
    GET /replica     200 on a healthy standby
    GET /serving     200 while this node takes new requests (pair: the primary;
                     pool: in service)
    GET /liveness    200 while the HA loop is turning
    GET /readiness   200 while the engine can take requests
    GET /ha/status   role, epoch, lease time left, engine health, last transition
    GET /ha/history  the HA events from the store
    GET /ha/config   the cluster-wide dynamic settings, and those in effect here
    GET /metrics     Prometheus
    GET /openapi.json  this API in OpenAPI 3 (ha_agent/openapi/agent.py)
Admin routes (Bearer token):
    POST /ha/switchover {"to"?}   planned hand-over; refused unless a target is healthy
    POST /ha/failover {"to", "force": true}   for when the primary is gone
    POST /ha/pause, /ha/resume    keep roles, suspend automatic actions
    POST /ha/failsafe             a primary that lost the store asks for our ack
    POST /ha/negotiate {"node", "epoch"}   a recovered node asks for the role back
                                  (failback=negotiated); granted only if we are degraded
    POST /ha/config {"config", "previous"?}   replace the dynamic settings (validated,
                                  compare-and-set against "previous"; CONFIG_CHANGED)
    POST /ha/restart-engine       restart this node's engine (refused on the primary)
    POST /ha/remove {"node"}      deregister a stopped node (refused for the primary)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from ha_agent.auth import Handler, TokenAuth
from ha_agent.config import DYNAMIC_SETTINGS, DynamicConfig
from ha_agent.dcs.base import DCSError, EngineState, Role
from ha_agent.httpjson import error, json_errors, optional_str, read_object
from ha_agent.node.engine_control import EngineControl, EngineControlError
from ha_agent.node.ha import Ha, Refusal, Refused
from ha_agent.node.metrics import AgentMetrics
from ha_agent.openapi.agent import AGENT_SPEC

# How each refusal answers: a conflict with the cluster's state, a node nobody
# registered, or a target that cannot serve.
_REFUSAL_STATUS = {
    Refusal.NO_PRIMARY: 409,
    Refusal.ALREADY_PRIMARY: 409,
    Refusal.UNKNOWN_NODE: 404,
    Refusal.NOT_HEALTHY: 412,
    Refusal.IS_PRIMARY: 409,
    Refusal.STILL_RUNS: 409,
    Refusal.CONFIG_CHANGED: 409,
}

# Patroni's other names for the same probes.
_ALIASES = {"leader": "primary", "standby": "replica"}


def _plain(ok: bool, detail: str) -> web.Response:
    return web.json_response({"ok": ok, "detail": detail}, status=200 if ok else 503)


class AgentApi:
    def __init__(
        self,
        ha: Ha,
        metrics: AgentMetrics,
        auth: TokenAuth,
        engine_control: EngineControl | None = None,
    ) -> None:
        self.ha = ha
        self.metrics = metrics
        self.auth = auth
        self.engine_control = engine_control
        self._restarting = False

    def app(self) -> web.Application:
        """The routes are the OpenAPI document's (openapi/agent.py), one table for both:
        `get /ha/status` is served by `get_status`; an operation that names a `security`
        scheme needs the token (every state-changing route: tests/unit/test_api_agent.py)."""
        app = web.Application(client_max_size=65536, middlewares=[json_errors])
        for path, operations in AGENT_SPEC["paths"].items():
            for method, operation in operations.items():
                handler = self._handler(method, path)
                if "security" in operation:
                    handler = self.auth.required(handler)
                if method == "get":
                    app.router.add_get(path, handler)  # and HEAD, for probes
                else:
                    app.router.add_route(method.upper(), path, handler)
        return app

    def _handler(self, method: str, path: str) -> Handler:
        name = path.rsplit("/", 1)[-1].removesuffix(".json").replace("-", "_")
        handler: Handler = getattr(self, f"{method}_{_ALIASES.get(name, name)}")
        return handler

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

    async def get_serving(self, request: web.Request) -> web.Response:
        if self.ha.is_serving():
            return _plain(True, "serving")
        if self.ha.pool is None:
            return _plain(False, f"not serving ({self.ha.status().role.value})")
        return _plain(False, self.ha.pool.out_reason or self.ha.pool_note or "not serving yet")

    async def get_liveness(self, request: web.Request) -> web.Response:
        age = self.ha.clock() - self.ha.last_cycle_at
        limit = self.ha.s.liveness_limit
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
            rows = await self.ha.history(count)
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
            moved = await self.ha.switch_over(target)
        except Refused as exc:
            return error(_REFUSAL_STATUS[exc.why], exc.detail)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        leader, chosen = moved.from_node, moved.to_node
        names = {"from": leader, "to": chosen}
        if request.query.get("wait", "true") == "false":
            return web.json_response(
                {"detail": f"switchover from {leader} to {chosen} requested", **names},
                status=202,
            )
        done = await self.ha.wait_for_leader(chosen, timeout=self.ha.s.handover_wait)
        if not done:
            return web.json_response(
                {
                    "detail": f"switchover from {leader} to {chosen} requested, not yet done",
                    **names,
                },
                status=202,
            )
        return web.json_response({"detail": f"switched over from {leader} to {chosen}", **names})

    async def post_failover(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        target = optional_str(body, "to")
        if target is None:
            return error(400, "failover needs 'to': the node to promote")
        if body.get("force") is not True:
            return error(400, 'failover drops the current lease; confirm with "force": true')
        try:
            moved = await self.ha.fail_over(target)
        except Refused as exc:
            return error(_REFUSAL_STATUS[exc.why], exc.detail)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        done = await self.ha.wait_for_leader(target, timeout=self.ha.s.handover_wait)
        status_code = 200 if done else 202
        return web.json_response(
            {
                "detail": f"forced failover from {moved.from_node} to {target}"
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
            await self.ha.set_paused(paused)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
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

    # -- dynamic settings, engine restart, decommission -----------------------------------

    def _effective(self) -> dict[str, Any]:
        return {k: getattr(self.ha.s, k) for k in DYNAMIC_SETTINGS if hasattr(self.ha.s, k)}

    async def get_config(self, request: web.Request) -> web.Response:
        try:
            config = await self.ha.stored_config()
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        except ValueError as exc:
            return error(409, f"the stored config is not valid: {exc}")
        return web.json_response(
            {"config": config.values(), "node": self.ha.name, "effective": self._effective()}
        )

    async def post_config(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        try:
            config = DynamicConfig.model_validate(body.get("config", {}))
            previous = (
                DynamicConfig.model_validate(body["previous"]) if "previous" in body else None
            )
        except ValidationError as exc:
            return error(422, "refused: " + _validation_message(exc))
        try:
            changes = await self.ha.edit_config(config, previous)
        except Refused as exc:
            return error(_REFUSAL_STATUS[exc.why], exc.detail)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        except ValueError as exc:
            return error(422, f"refused: {exc}")
        if not changes:
            return web.json_response({"detail": "no change", "config": config.values(), "diff": []})
        return web.json_response(
            {"detail": "; ".join(changes), "config": config.values(), "diff": changes}
        )

    async def post_restart_engine(self, request: web.Request) -> web.Response:
        if self.engine_control is None:
            return error(409, f"{self.ha.name} does not run its engine (sidecar): restart it there")
        if self.ha.state.role is Role.PRIMARY:
            return error(
                409, f"{self.ha.name} is the primary: switch over first (sglang-ha restart does)"
            )
        if self._restarting:
            return error(409, f"{self.ha.name}: a restart is already under way")
        self._restarting = True
        try:
            self.ha.restart_engine_requested()
            # A hung engine never finishes SGLang's SIGTERM drain: killed instead.
            hung = self.ha.engine_health.state is EngineState.HUNG
            pid = await self.engine_control.restart(hung=hung)
        except EngineControlError as exc:
            return error(503, f"could not restart the engine: {exc}")
        finally:
            self._restarting = False
        return web.json_response(
            {"detail": f"engine of {self.ha.name} restarted (pid {pid})", "pid": pid}
        )

    async def post_remove(self, request: web.Request) -> web.Response:
        body = await read_object(request)
        node = optional_str(body, "node")
        if node is None:
            return error(400, "remove needs 'node': the node to deregister")
        try:
            await self.ha.remove_node(node)
        except Refused as exc:
            return error(_REFUSAL_STATUS[exc.why], exc.detail)
        except DCSError as exc:
            return error(503, f"coordination store unreachable: {exc}")
        return web.json_response({"detail": f"removed {node} from the cluster"})


def _validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line: `lease_ttl: Input should be greater than 0`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
    )
