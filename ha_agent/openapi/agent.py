"""OpenAPI description of the node agent's REST API (ha_agent/node/api.py)."""

from __future__ import annotations

from typing import Any

from ha_agent.openapi import (
    JSON,
    OPENAPI_VERSION,
    error_schema,
    json_response,
    metrics_path,
)

_OK = {
    "type": "object",
    "required": ["ok", "detail"],
    "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
}
_NAME = {"type": "string", "minLength": 1}
_EPOCH = {"type": "integer"}


def _probe(summary: str) -> dict[str, Any]:
    """A plain 200/503 check any load balancer can use."""
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": json_response("yes", _OK),
                "503": json_response("no", _OK),
            },
        }
    }


def _errors(*codes: int) -> dict[str, Any]:
    words = {
        400: "malformed body",
        401: "missing or wrong admin token",
        403: "admin endpoints disabled (no token configured)",
        404: "unknown node",
        409: "refused in the current state",
        412: "the target is not healthy",
        413: "body too large",
        422: "refused: breaks the settings' schema or the lease-timing rule",
        503: "coordination store unreachable",
    }
    return {str(c): json_response(words[c], error_schema()) for c in codes}


def _admin(
    summary: str,
    body: dict[str, Any] | None,
    ok: dict[str, Any],
    *codes: int,
    params: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {**_errors(401, 403, *codes), **ok},
    }
    if body is not None:
        op["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
        op["responses"].update(_errors(400, 413))
    if params:
        op["parameters"] = params
    return {"post": op}


def _obj(required: list[str], **props: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


_DETAIL = _obj(["detail"], detail={"type": "string"})
# The dynamic settings as JSON (ha_agent.config.DynamicConfig); the agent checks them.
_CONFIG = {"type": "object", "description": "setting name -> value (only those set)"}

AGENT_SPEC: dict[str, Any] = {
    "openapi": OPENAPI_VERSION,
    "info": {
        "title": "sglang-ha node agent",
        "version": "1",
        "description": "Health checks (no auth, nothing secret) and admin actions"
        " (Bearer token). Reachable on the internal network only.",
    },
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/health": _probe("200 while the engine is healthy, whatever the role"),
        "/primary": _probe("200 only on the primary with a certainly-valid lease"),
        "/leader": _probe("same as /primary"),
        "/replica": _probe("200 on a healthy standby"),
        "/standby": _probe("same as /replica"),
        "/serving": _probe(
            "200 while this node takes new requests: the primary in pair mode, a node"
            " in service in pool mode (engine healthy, rejoin damping passed)"
        ),
        "/liveness": _probe("200 while the HA loop is turning"),
        "/readiness": _probe("200 while the engine can take requests"),
        "/ha/status": {
            "get": {
                "summary": "role, epoch, lease, engine health, last transition",
                "responses": {
                    "200": json_response(
                        "the agent's view",
                        _obj(
                            ["node", "role", "epoch", "engine"],
                            node={"type": "string"},
                            role={"type": "string"},
                            epoch={"type": "integer"},
                            engine={"type": "object"},
                            mode={"type": "string", "enum": ["pair", "pool"]},
                            serving={
                                "type": "boolean",
                                "description": "takes new requests: the primary in pair"
                                " mode, a node in service in pool mode",
                            },
                            pool={
                                "type": "string",
                                "description": "pool mode: the serving decision, in words",
                            },
                        ),
                    )
                },
            }
        },
        "/ha/history": {
            "get": {
                "summary": "HA events from the store, oldest first",
                "parameters": [
                    {
                        "name": "count",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer"},
                        "description": "How many (clamped to 1..10000; default 100).",
                    }
                ],
                "responses": {
                    "200": json_response(
                        "events",
                        {
                            "type": "array",
                            "items": _obj(
                                ["ts", "event", "node", "detail"],
                                ts={"type": "number"},
                                event={"type": "string"},
                                node={"type": "string"},
                                detail={"type": "string"},
                            ),
                        },
                    ),
                    **_errors(400, 503),
                },
            }
        },
        "/metrics": metrics_path(),
        "/openapi.json": {
            "get": {
                "summary": "this document",
                "responses": {"200": json_response("OpenAPI document")},
            }
        },
        "/ha/switchover": _admin(
            "planned hand-over; refused unless a target is healthy",
            _obj([], to={**_NAME, "nullable": True, "description": "default: any standby"}),
            {
                "200": json_response("switched over", _DETAIL),
                "202": json_response("requested, not done yet", _DETAIL),
            },
            404,
            409,
            412,
            503,
            params=[
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                    "description": '"false": answer at once (202) instead of waiting.',
                }
            ],
        ),
        "/ha/failover": _admin(
            "forced promotion, for when the primary is gone",
            _obj(["to", "force"], to=_NAME, force={"type": "boolean", "enum": [True]}),
            {
                "200": json_response("promoted", _DETAIL),
                "202": json_response("requested, not done yet", _DETAIL),
            },
            404,
            412,
            503,
        ),
        "/ha/pause": _admin(
            "keep roles, suspend automatic actions",
            None,
            {"200": json_response("paused", _obj(["paused"], paused={"type": "boolean"}))},
            503,
        ),
        "/ha/resume": _admin(
            "resume automatic actions",
            None,
            {"200": json_response("resumed", _obj(["paused"], paused={"type": "boolean"}))},
            503,
        ),
        "/ha/failsafe": _admin(
            "a primary that lost the store asks for our acknowledgement",
            _obj(["leader", "epoch"], leader=_NAME, epoch=_EPOCH),
            {
                "200": json_response("acknowledged", _obj(["ack"], ack={"type": "boolean"})),
                "409": json_response("not acknowledged", _obj(["ack"], ack={"type": "boolean"})),
            },
        ),
        "/ha/config": {
            "get": {
                "summary": "the cluster-wide dynamic settings, and those in effect here",
                "responses": {
                    "200": json_response(
                        "stored and effective settings",
                        _obj(
                            ["config", "node", "effective"],
                            config=_CONFIG,
                            node={"type": "string"},
                            effective={"type": "object"},
                        ),
                    ),
                    **_errors(409, 503),
                },
            },
            **_admin(
                "replace the dynamic settings (validated; compare-and-set on 'previous')",
                _obj([], config=_CONFIG, previous=_CONFIG),
                {
                    "200": json_response(
                        "stored (or no change)",
                        _obj(
                            ["detail", "config", "diff"],
                            detail={"type": "string"},
                            config=_CONFIG,
                            diff={"type": "array", "items": {"type": "string"}},
                        ),
                    )
                },
                409,
                422,
                503,
            ),
        },
        "/ha/restart-engine": _admin(
            "restart this node's engine through supervisord (refused on the primary)",
            None,
            {
                "200": json_response(
                    "restarted", _obj(["detail", "pid"], detail={"type": "string"}, pid=_EPOCH)
                )
            },
            409,
            503,
        ),
        "/ha/remove": _admin(
            "deregister a stopped node (refused for the primary or a running agent)",
            _obj(["node"], node=_NAME),
            {"200": json_response("removed", _DETAIL)},
            404,
            409,
            503,
        ),
        "/ha/negotiate": _admin(
            "a recovered node asks for the primary role back (failback=negotiated)",
            _obj(["node", "epoch"], node=_NAME, epoch=_EPOCH),
            {
                "200": json_response(
                    "granted",
                    _obj(["granted", "detail"], granted={"type": "boolean"}, detail={}),
                )
            },
            409,
        ),
    },
}
