"""Small JSON helpers for the aiohttp APIs: clear 4xx for bad bodies."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def error(status: int, message: str) -> web.Response:
    return web.json_response({"detail": message}, status=status)


async def read_object(request: web.Request, max_bytes: int = 65536) -> dict[str, Any]:
    """The request body as a JSON object; raises HTTPBadRequest with a reason."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=request.content_length)
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(raw))
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"detail": f"body is not valid JSON: {exc}"}),
            content_type="application/json",
        ) from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"detail": "body must be a JSON object"}),
            content_type="application/json",
        )
    return body


def optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise web.HTTPBadRequest(
            text=json.dumps({"detail": f"'{key}' must be a non-empty string"}),
            content_type="application/json",
        )
    return value
