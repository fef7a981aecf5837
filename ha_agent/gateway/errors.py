"""Every refusal the relay answers itself, in SGLang's shape for the route (the
endpoint table's `ErrorShape`; bodies from `openapi.inference.error_body`)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ha_agent.openapi import inference
from ha_agent.openapi.endpoints import Endpoint, lookup

JSON = "application/json"  # as SGLang's ORJSONResponse: no charset


def json_response(obj: Any, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(obj).encode(), status=status, content_type=JSON, headers=headers
    )


def refusal(
    route: Endpoint | None, bad: inference.BadInput, headers: dict[str, str] | None = None
) -> web.Response:
    """`bad` answered as SGLang would on this route (None: a route it does not serve)."""
    body = inference.error_body(route.errors if route is not None else None, bad)
    return json_response(body, bad.status, headers)


def refusal_at(
    path: str, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The same, for a request known only by its path."""
    return refusal(lookup(path), inference.BadInput(message, status), headers)
