"""The relay's internal API: health, status, metrics (not exposed through Nginx)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.httpjson import json_errors
from ha_agent.openapi.relay import ADMIN_SPEC, INFERENCE_SPEC


class RelayAdmin:
    def __init__(self, topology: Topology, metrics: RelayMetrics) -> None:
        self.topology = topology
        self.metrics = metrics

    def app(self) -> web.Application:
        # Read-only, internal network only; nothing here changes what the relay does.
        app = web.Application(client_max_size=4096, middlewares=[json_errors])
        app.router.add_get("/health", self.get_health)
        app.router.add_get("/relay/status", self.get_status)
        app.router.add_get("/metrics", self.get_metrics)
        app.router.add_get("/openapi.json", self.get_openapi)
        app.router.add_get("/openapi/inference.json", self.get_inference_openapi)
        return app

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(ADMIN_SPEC)

    async def get_inference_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(INFERENCE_SPEC)

    async def get_health(self, request: web.Request) -> web.Response:
        """200 while the view is fresh and some node can serve; 503 otherwise."""
        t = self.topology
        now = t.clock()
        fresh = now - t.last_refresh < max(5 * t.s.poll_interval, 3.0)
        serving = any(n.can_serve(now) for n in t.nodes.values())
        ok = fresh and serving
        detail = "ok" if ok else ("view is stale" if not fresh else "no node can serve")
        return web.json_response({"ok": ok, "detail": detail}, status=200 if ok else 503)

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.topology.snapshot())

    async def get_metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.exposed),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
