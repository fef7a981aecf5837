"""OpenAPI descriptions of sglang-ha's HTTP APIs, and the public surface they define.

- `agent.py`: the node agent's REST API (health, status, admin), served at
  ``GET /openapi.json`` by the agent;
- `relay.py`: the gateway's public inference API (what Nginx and the relay let
  through) and the relay's internal admin API, served at ``GET /openapi.json`` on
  the relay's admin port;
- `inference.py`: the checks the relay applies to public requests before anything
  reaches an engine (which paths exist, sane sampling parameters).

The documents are plain dicts (no YAML dependency, nothing to ship as package data)
and are what the fuzz tests (tests/unit/test_fuzz_*.py) generate requests from.
"""

from __future__ import annotations

from typing import Any

OPENAPI_VERSION = "3.0.3"

JSON = "application/json"


def error_schema() -> dict[str, Any]:
    """The agents' error body: ``{"detail": "..."}``."""
    return {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "string"}},
    }


def json_response(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {JSON: {"schema": schema or {"type": "object"}}},
    }


def metrics_path() -> dict[str, Any]:
    """``GET /metrics``: Prometheus text, served the same way by the agent and the relay."""
    return {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {
                "200": {"description": "metrics", "content": {"text/plain": {"schema": {}}}}
            },
        }
    }
