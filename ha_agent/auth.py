"""Shared-token authentication for admin endpoints (agent and relay)."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import Counter

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TokenAuth:
    """Bearer-token check, constant-time; refuses everything when no token is set.

    Rejections are counted (by route, never by token or raw path: the label set stays
    bounded whatever clients send) and logged at most once a second, so a flood of
    bad attempts cannot fill the disk. Neither the log nor the metric holds what the
    client sent as a token.
    """

    def __init__(self, token: str | None, rejected: Counter) -> None:
        self._token = token.encode() if token else None
        self._rejected = rejected
        self._last_log = 0.0
        self._suppressed = 0

    def check(self, request: web.Request) -> web.Response | None:
        """None if allowed, else the response to send."""
        if self._token is None:
            return _error(403, "admin endpoints are disabled: no admin token is configured")
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # surrogateescape: a header with bytes that are not UTF-8 is a wrong token, not a 500.
        candidate = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() == "bearer" and hmac.compare_digest(candidate, self._token):
            return None
        self._rejected.labels(endpoint=_route(request)).inc()
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            log.warning(
                "rejected admin request %s %s from %s (%d more suppressed)",
                request.method,
                _route(request),
                request.remote,
                self._suppressed,
            )
            self._last_log, self._suppressed = now, 0
        else:
            self._suppressed += 1
        return _error(401, "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"})

    def required(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            denied = self.check(request)
            return denied if denied is not None else await handler(request)

        return wrapped


def _route(request: web.Request) -> str:
    """The route's template (e.g. /ha/pause), not the raw path the client sent."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "-"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": message}, status=status, headers=headers)
