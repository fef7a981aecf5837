"""CORS at the relay, as SGLang answers it.

SGLang always adds Starlette's CORSMiddleware with every origin, method and header
allowed and credentials on (python/sglang/srt/entrypoints/http_server.py;
starlette/middleware/cors.py), and its API-key check lets every OPTIONS through
(python/sglang/srt/utils/auth.py). So a browser client that works against SGLang
needs: preflights answered 200 without a key, and `Access-Control-Allow-Origin` on
every answer to a request with an `Origin`.

The relay answers preflights itself (no engine needed) and sets the CORS headers on
every response it sends, its own refusals included, after dropping any an engine
sent: what a browser sees is the gateway's policy (`HA_CORS_ALLOW_ORIGINS`, empty to
turn CORS off), whichever node answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

# Starlette's ALL_METHODS and SAFELISTED_HEADERS.
ALL_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
MAX_AGE = "600"


@dataclass(frozen=True)
class Cors:
    origins: frozenset[str]  # "*" for any
    credentials: bool = True

    @classmethod
    def parse(cls, origins: str, credentials: bool) -> Cors | None:
        allowed = frozenset(o.strip() for o in origins.split(",") if o.strip())
        return cls(allowed, credentials) if allowed else None

    @property
    def any_origin(self) -> bool:
        return "*" in self.origins

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        return (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        )

    def preflight(self, request: web.Request) -> web.Response:
        """CORSMiddleware.preflight_response with allow_methods/headers "*"."""
        origin = request.headers["Origin"]
        headers: dict[str, str] = {}
        explicit = not self.any_origin or self.credentials
        if explicit:
            headers["Vary"] = "Origin"
        else:
            headers["Access-Control-Allow-Origin"] = "*"
        headers["Access-Control-Allow-Methods"] = ALL_METHODS
        headers["Access-Control-Max-Age"] = MAX_AGE
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        ok = self.allowed(origin)
        if ok and explicit:
            headers["Access-Control-Allow-Origin"] = origin
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested is not None:
            headers["Access-Control-Allow-Headers"] = requested
        if not ok:
            return web.Response(
                status=400, text="Disallowed CORS origin", headers=headers, charset="utf-8"
            )
        return web.Response(status=200, text="OK", headers=headers, charset="utf-8")

    def simple(self, request: web.Request, response: web.StreamResponse) -> None:
        """CORSMiddleware.simple_response: the headers on an answer to a request."""
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if self.any_origin:
            response.headers["Access-Control-Allow-Origin"] = "*"
        if self.credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        if (self.any_origin and "Cookie" in request.headers) or (
            not self.any_origin and self.allowed(origin)
        ):
            response.headers["Access-Control-Allow-Origin"] = origin
            vary = response.headers.get("Vary")
            response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def on_prepare(
    cors: Cors | None,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """aiohttp on_response_prepare: the gateway's CORS headers on every answer, and
    none of an engine's (a preflight the relay answered keeps its own)."""

    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        if cors is not None and cors.is_preflight(request):
            return
        for name in [k for k in response.headers if k.lower().startswith("access-control-")]:
            del response.headers[name]
        if cors is not None:
            cors.simple(request, response)

    return prepare
