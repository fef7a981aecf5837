"""Small JSON helpers for the aiohttp APIs: clear 4xx for bad bodies, JSON for every error."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from ha_agent.auth import Handler

log = logging.getLogger(__name__)

# Headers an error answer keeps (what the client needs to act on it).
_KEEP_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")


def error(status: int, message: str) -> web.Response:
    return web.json_response({"detail": message}, status=status)


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"detail": message}), content_type="application/json")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


async def read_object(request: web.Request, max_bytes: int = 65536) -> dict[str, Any]:
    """The request body as a JSON object; raises an HTTP 400/413 with the reason."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=request.content_length)
    raw = bytearray()
    # read(n) returns what has arrived, not n bytes: loop (chunked bodies included).
    while chunk := await request.content.read(max_bytes + 1 - len(raw)):
        raw += chunk
        if len(raw) > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(raw))
    if not raw.strip():
        return {}
    try:
        body = json.loads(bytes(raw), parse_constant=_no_constant)
    except RecursionError:
        raise _bad_request("body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_request(f"body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _bad_request("body must be a JSON object")
    return body


def optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _bad_request(f"'{key}' must be a non-empty string")
    return value


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as ``{"detail": ...}`` JSON: aiohttp's own 404/405/413 included.

    An unexpected exception is a bug: logged as such (the integration suite fails on
    BUG lines) and answered 500 without internals.
    """
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        detail = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
        headers = {k: exc.headers[k] for k in _KEEP_HEADERS if k in exc.headers}
        return web.json_response({"detail": detail}, status=exc.status, headers=headers)
    except Exception:
        log.exception("BUG: unhandled error answering %s %s", request.method, request.path[:200])
        return error(500, "internal error")
