"""OpenAPI descriptions of the gateway: the public inference API and the relay's admin API.

The public document describes what Nginx and the relay let through and the limits
the relay enforces (inference.py); fields it does not describe are the engine's
business and pass on untouched (``additionalProperties`` stays open).
"""

from __future__ import annotations

from typing import Any

from ha_agent.openapi import JSON, OPENAPI_VERSION, json_response, metrics_path
from ha_agent.openapi.endpoints import ROUTES, Endpoint
from ha_agent.openapi.inference import MAX_N, MAX_TOP_LOGPROBS


def _n(schema: dict[str, Any]) -> dict[str, Any]:
    """Optional field: null means absent, as for SGLang (JSON Schema 2020-12 style)."""
    if "type" in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {**schema, "anyOf": [*schema["anyOf"], {"type": "null"}]}


def _given(name: str) -> dict[str, Any]:
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}}


def _lax(fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI routes read values as SGLang's pydantic models do (lax mode):
    numbers and booleans may come as strings ("0.5", "8", "false") and booleans as
    0/1; what the relay cannot read so is the engine's to refuse."""
    out = {}
    for key, schema in fields.items():
        types = schema.get("type")
        scalar = isinstance(types, list) and any(
            t in types for t in ("number", "integer", "boolean")
        )
        if scalar:
            out[key] = {"anyOf": [schema, {"type": "string"}, {"type": "boolean"}]}
        else:
            out[key] = schema
    return out


def _sampling(max_key: str, max_minimum: int, min_key: str) -> dict[str, Any]:
    return {
        "temperature": _n({"type": "number", "minimum": 0}),
        "top_p": _n({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        "min_p": _n({"type": "number", "minimum": 0, "maximum": 1}),
        "top_k": _n(
            {
                "type": "integer",
                "description": "-1 (disabled) or at least 1",
                "anyOf": [{"minimum": 1}, {"enum": [-1]}],
            }
        ),
        "frequency_penalty": _n({"type": "number", "minimum": -2, "maximum": 2}),
        "presence_penalty": _n({"type": "number", "minimum": -2, "maximum": 2}),
        "repetition_penalty": _n({"type": "number", "exclusiveMinimum": 0, "maximum": 2}),
        max_key: _n({"type": "integer", "minimum": max_minimum}),
        min_key: _n({"type": "integer", "minimum": 0, "description": f"at most {max_key}"}),
        "n": _n({"type": "integer", "minimum": 1, "maximum": MAX_N}),
        "stop_token_ids": _n(_TOKEN_IDS),
        "logit_bias": _n({"type": "object", "additionalProperties": {"type": "number"}}),
    }


_OPENAI_COMMON = {
    "model": _n({"type": "string"}),
    "stream": _n({"type": "boolean"}),
    "seed": _n({"type": "integer"}),
}

CHAT_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {"role": {"type": "string"}},
            },
        },
        **_lax(
            {
                **_OPENAI_COMMON,
                **_sampling("max_tokens", 0, "min_tokens"),
                "max_completion_tokens": _n({"type": "integer", "minimum": 0}),
                "top_logprobs": _n({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
            }
        ),
    },
}

COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {**_TOKEN_IDS, "minItems": 1},
                {"type": "array", "minItems": 1, "items": {**_TOKEN_IDS, "minItems": 1}},
            ]
        },
        **_lax(
            {
                **_OPENAI_COMMON,
                **_sampling("max_tokens", 1, "min_tokens"),
                "logprobs": _n({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
            }
        ),
    },
}

_SAMPLING_PARAMS = {
    "type": "object",
    "properties": _sampling("max_new_tokens", 0, "min_new_tokens"),
}

GENERATE_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": "one of text, input_ids, input_embeds (text wins, as SGLang)",
    "properties": {
        "text": _n({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
        "input_ids": _n(
            {
                "anyOf": [
                    {**_TOKEN_IDS, "minItems": 1},
                    {"type": "array", "minItems": 1, "items": {**_TOKEN_IDS, "minItems": 1}},
                ]
            }
        ),
        "sampling_params": _n(
            {"anyOf": [_SAMPLING_PARAMS, {"type": "array", "items": _SAMPLING_PARAMS}]}
        ),
        **_lax({"stream": _n({"type": "boolean"})}),
    },
    "anyOf": [_given("text"), _given("input_ids"), _given("input_embeds")],
}

_ERROR = {"type": "object", "description": "OpenAI-style error (engine errors pass through)"}
_EVENTS = "text/event-stream"


def _generation(summary: str, body: dict[str, Any], *engine_codes: int) -> dict[str, Any]:
    extra = {str(c): json_response("the engine's answer", _ERROR) for c in engine_codes}
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {JSON: {"schema": body}}},
            "responses": {
                "200": {
                    "description": "the answer, or its stream of events when stream is true",
                    "content": {JSON: {"schema": {}}, _EVENTS: {"schema": {}}},
                },
                "400": json_response("refused: malformed or invalid parameters", _ERROR),
                "413": json_response("body too large", _ERROR),
                "429": json_response("rate limited (Nginx, per client)", _ERROR),
                "503": json_response("no node could serve it", _ERROR),
                **extra,
            },
        }
    }


def _read(summary: str, *extra: int) -> dict[str, Any]:
    responses = {"200": json_response(summary, {})}
    for code in extra:
        responses[str(code)] = json_response("engine answer", _ERROR)
    return {"get": {"summary": summary, "responses": responses}}


def _probe(summary: str) -> dict[str, Any]:
    """SGLang's health answers: a status, no body."""
    return {
        "get": {
            "summary": summary,
            "responses": {"200": {"description": "healthy"}, "503": {"description": "not"}},
        }
    }


INFERENCE_SPEC: dict[str, Any] = {
    "openapi": "3.1.0",  # JSON Schema 2020-12: "null means absent" is expressible
    "info": {
        "title": "sglang-ha gateway: public inference API",
        "version": "1",
        "description": "The only paths the gateway serves; every other path is 404 and"
        " never reaches an engine. Bodies are SGLang's; the limits below are checked"
        " by the relay before a request is sent on.",
    },
    "paths": {
        "/v1/chat/completions": _generation("OpenAI chat completion", CHAT_REQUEST),
        "/v1/completions": _generation("OpenAI completion", COMPLETION_REQUEST),
        "/generate": _generation("SGLang native generation", GENERATE_REQUEST),
        "/v1/embeddings": _generation(
            "OpenAI embeddings (400 where the engine serves no embedding model)",
            {"type": "object"},
            400,
        ),
        "/v1/models": _read("served models"),
        "/v1/models/{model}": {
            "get": {
                "summary": "one served model",
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "schema": {
                            "type": "string",
                            "pattern": r"^[A-Za-z0-9_:@+-][A-Za-z0-9._:@+-]*$",
                        },
                    }
                ],
                "responses": {
                    "200": json_response("the model", {}),
                    "404": json_response("unknown model", _ERROR),
                },
            }
        },
        "/health": _probe("engine health (the primary's)"),
        "/health_generate": _probe("engine health with a generation"),
        "/model_info": _read("model information"),
        "/get_model_info": _read("model information"),
    },
}


def _relayed(endpoint: Endpoint) -> dict[str, Any]:
    """A route the relay passes on without checking more than its JSON."""
    operation = {
        "summary": f"{endpoint.kind}: {endpoint.semantics.value} (docs/compatibility.md)",
        "requestBody": {"required": True, "content": {JSON: {"schema": {"type": "object"}}}},
        "responses": {
            "200": {"description": "the engine's answer"},
            "400": json_response("refused (by the relay or the engine)", _ERROR),
            "403": json_response("abort_all is not available through the gateway", _ERROR),
            "503": json_response("no node could serve it", _ERROR),
        },
    }
    return {m.lower(): operation for m in sorted(endpoint.methods) if m != "HEAD"}


# Every other public route of the endpoint table, as relayed.
for _endpoint in ROUTES:
    if _endpoint.path not in INFERENCE_SPEC["paths"]:
        INFERENCE_SPEC["paths"][_endpoint.path] = _relayed(_endpoint)
INFERENCE_SPEC["paths"]["/generate"]["put"] = INFERENCE_SPEC["paths"]["/generate"]["post"]

_OK = {
    "type": "object",
    "required": ["ok", "detail"],
    "properties": {"ok": {"type": "boolean"}, "detail": {"type": "string"}},
}

ADMIN_SPEC: dict[str, Any] = {
    "openapi": OPENAPI_VERSION,
    "info": {
        "title": "sglang-ha relay: internal admin API",
        "version": "1",
        "description": "Read-only health, status and metrics; internal network only.",
    },
    "paths": {
        "/health": {
            "get": {
                "summary": "200 while the view is fresh and some node can serve",
                "responses": {"200": json_response("ok", _OK), "503": json_response("no", _OK)},
            }
        },
        "/relay/status": {
            "get": {
                "summary": "primary, epoch and each node as the relay sees it",
                "responses": {
                    "200": json_response(
                        "the relay's view",
                        {
                            "type": "object",
                            "required": ["primary", "epoch", "nodes"],
                            "properties": {
                                "primary": {"type": "string", "nullable": True},
                                "epoch": {"type": "integer"},
                                "nodes": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    )
                },
            }
        },
        "/metrics": metrics_path(),
        "/openapi.json": {
            "get": {"summary": "this document", "responses": {"200": json_response("document")}}
        },
        "/openapi/inference.json": {
            "get": {
                "summary": "the public inference API's document",
                "responses": {"200": json_response("document")},
            }
        },
    },
}
