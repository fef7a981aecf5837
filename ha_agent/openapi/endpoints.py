"""The public SGLang API, one row per route: what the relay, the warmer, the request
checks, the simulator and the docs all read, so that a route is described once.

Every row is a route SGLang 0.5.19 serves (python/sglang/srt/entrypoints/http_server.py)
and says how the gateway treats it:

- `Semantics.MIGRATE`: a generation. Unary answers are retried on another node before
  the first byte; a stream that breaks after it is continued elsewhere
  (gateway/stream/migration.py) or ended with an explicit retryable error event.
- `Semantics.STREAM_ERROR`: a generation whose stream cannot be resumed (the Responses
  API: its events carry sequence numbers and output item ids that a second engine
  would restart): unary retried before the first byte; a broken stream ends with an
  explicit `error` event.
- `Semantics.IDEMPOTENT`: no state changes on the engine (embeddings, tokenize, score,
  model info...): retried on another node like any unary request.
- `Semantics.SCOPED_ABORT`: `/abort_request`, answered by the relay itself for the
  requests the same credential started (SGLang's own route is admin surface).

Anything not in this table (the admin surface: /flush_cache, /pause_generation,
weight updates, profiling, /server_info, ...) is answered 404 by the relay and Nginx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Semantics(Enum):
    MIGRATE = "migrate"
    STREAM_ERROR = "stream-error"
    IDEMPOTENT = "idempotent"
    SCOPED_ABORT = "scoped-abort"


class ErrorShape(Enum):
    """How SGLang words a 400 on this route (http_server.py, serving_base.py)."""

    NATIVE = "native"  # _create_error_response: {"error": {"message": ...}}
    OPENAI = "openai"  # ErrorResponse: {"object": "error", "message", "type", "param", "code"}
    RESPONSES = "responses"  # serving_responses.py: {"error": {"message", "type", "param", "code"}}


# Generation kinds (gateway/stream/migration.py has one strategy per kind).
GENERATE, COMPLETIONS, CHAT, RESPONSES = "generate", "completions", "chat", "responses"


@dataclass(frozen=True)
class Endpoint:
    path: str
    kind: str
    methods: frozenset[str]
    semantics: Semantics
    errors: ErrorShape
    # The request field holding the prompt, the completion budget, and the keys that
    # constrain the output to a grammar (none of these for non-generation routes).
    prompt_field: str | None = None
    budget_keys: tuple[str, ...] = ()
    constraint_keys: tuple[str, ...] = ()
    json_body: bool = False  # a JSON body the relay parses and checks

    @property
    def generation(self) -> bool:
        return self.semantics in (Semantics.MIGRATE, Semantics.STREAM_ERROR)


_POST = frozenset({"POST"})
_POST_PUT = frozenset({"POST", "PUT"})
_GET = frozenset({"GET", "HEAD"})
_GRAMMAR = ("json_schema", "regex", "ebnf", "structural_tag")
_OPENAI_GRAMMAR = ("json_schema", "regex", "ebnf", "response_format")


def _unary(
    path: str, kind: str, methods: frozenset[str] = _POST, errors: ErrorShape = ErrorShape.OPENAI
) -> Endpoint:
    return Endpoint(path, kind, methods, Semantics.IDEMPOTENT, errors, json_body=True)


def _generation(
    path: str,
    kind: str,
    errors: ErrorShape,
    prompt_field: str,
    budget_keys: tuple[str, ...],
    constraint_keys: tuple[str, ...],
    methods: frozenset[str] = _POST,
    semantics: Semantics = Semantics.MIGRATE,
) -> Endpoint:
    return Endpoint(
        path,
        kind,
        methods,
        semantics,
        errors,
        prompt_field=prompt_field,
        budget_keys=budget_keys,
        constraint_keys=constraint_keys,
        json_body=True,
    )


# fmt: off
ROUTES: tuple[Endpoint, ...] = (
    _generation("/generate", GENERATE, ErrorShape.NATIVE, "text",
                ("sampling_params.max_new_tokens",), _GRAMMAR, _POST_PUT),
    _generation("/v1/completions", COMPLETIONS, ErrorShape.OPENAI, "prompt",
                ("max_tokens",), _OPENAI_GRAMMAR),
    _generation("/v1/chat/completions", CHAT, ErrorShape.OPENAI, "messages",
                ("max_completion_tokens", "max_tokens"), (*_OPENAI_GRAMMAR, "tools")),
    _generation("/v1/responses", RESPONSES, ErrorShape.RESPONSES, "input",
                ("max_output_tokens",), ("text", "tools"), semantics=Semantics.STREAM_ERROR),
    _unary("/v1/embeddings", "embeddings"),
    _unary("/v1/classify", "classify"),
    _unary("/encode", "encode", _POST_PUT, errors=ErrorShape.NATIVE),
    _unary("/classify", "classify-native", _POST_PUT, errors=ErrorShape.NATIVE),
    _unary("/v1/tokenize", "tokenize"),
    _unary("/tokenize", "tokenize"),
    _unary("/v1/detokenize", "detokenize"),
    _unary("/detokenize", "detokenize"),
    _unary("/v1/rerank", "rerank", _POST_PUT),
    _unary("/v1/score", "score"),
    Endpoint("/v1/models", "models", _GET, Semantics.IDEMPOTENT, ErrorShape.OPENAI),
    Endpoint("/health", "health", _GET, Semantics.IDEMPOTENT, ErrorShape.OPENAI),
    Endpoint("/health_generate", "health", _GET, Semantics.IDEMPOTENT, ErrorShape.OPENAI),
    Endpoint("/model_info", "model_info", _GET, Semantics.IDEMPOTENT, ErrorShape.OPENAI),
    Endpoint("/get_model_info", "model_info", _GET, Semantics.IDEMPOTENT, ErrorShape.OPENAI),
    Endpoint(
        "/abort_request", "abort", _POST, Semantics.SCOPED_ABORT, ErrorShape.NATIVE, json_body=True
    ),
)
# fmt: on
BY_PATH: dict[str, Endpoint] = {e.path: e for e in ROUTES}

# `GET /v1/models/{id}`: ids like "Qwen/Qwen2.5-7B-Instruct"; nothing that could be
# read as another path by a server behind us (no dot segments, no escapes).
MODEL_PREFIX = "/v1/models/"
MODEL_ID = re.compile(r"[A-Za-z0-9_:@+-][A-Za-z0-9._:@+-]*")  # no part starts with "."
MODEL_ROUTE = Endpoint(MODEL_PREFIX, "models", _GET, Semantics.IDEMPOTENT, ErrorShape.OPENAI)

# The generation kinds and their paths (the warmer sends prefill-only mirrors there).
GENERATION_PATHS: dict[str, str] = {e.kind: e.path for e in ROUTES if e.generation}


def lookup(path: str) -> Endpoint | None:
    """The row for an exact request path (before any decoding), or None."""
    found = BY_PATH.get(path)
    if found is None and path.startswith(MODEL_PREFIX):
        parts = path[len(MODEL_PREFIX) :].split("/")
        if all(MODEL_ID.fullmatch(p) for p in parts):
            return MODEL_ROUTE
    return found
