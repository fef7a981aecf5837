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
from typing import Any


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


# Generation kinds (gateway/stream/migration.py registers one strategy per MIGRATE kind).
GENERATE, COMPLETIONS, CHAT, RESPONSES = "generate", "completions", "chat", "responses"

# The sampling keys that compile a grammar (SamplingParams, srt/sampling/sampling_params.py),
# listed once. /generate sends them in `sampling_params`. At the top level of the OpenAI
# requests (srt/entrypoints/openai/protocol.py) CompletionRequest has `regex`,
# `json_schema` and `ebnf`, ChatCompletionRequest `regex` and `ebnf` (the relay reads a
# chat `json_schema` too), and `structural_tag` comes only from `response_format`.
GRAMMAR_KEYS = ("regex", "json_schema", "ebnf", "structural_tag")
FORMAT_KEY = "response_format"  # ResponseFormat: "text" leaves the output free
TOOLS_KEY = "tools"  # tool calls, unless `tool_choice` is "none"


class PromptShape(Enum):
    """How a generation's prompt field holds its text."""

    TEXT = "text"  # a string or token ids, or a list of either (a batch)
    MESSAGES = "messages"  # chat messages: string contents and `text` content parts


def as_int(value: Any) -> int | None:
    """SGLang's pydantic models coerce "16" to 16; a bad value is the engine's to refuse."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Endpoint:
    path: str
    kind: str
    methods: frozenset[str]
    semantics: Semantics
    errors: ErrorShape
    json_body: bool = False  # a JSON body the relay parses and checks
    # Generation routes only: how SGLang's request model for the route reads the body.
    # The prompt's fields and how they hold text. /generate has two (GenerateReqInput:
    # `text` or `input_ids`, srt/managers/io_struct.py); the first one present is "the
    # prompt" where one value is needed.
    prompt_fields: tuple[str, ...] = ()
    prompt_shape: PromptShape = PromptShape.TEXT
    # Where the sampling keys below live: a body key holding them ("sampling_params"),
    # or None for the body's top level.
    params: str | None = None
    # The completion budget: an earlier key wins when it is set to a non-zero value
    # (`max_completion_tokens or max_tokens`), the last key applies otherwise, and
    # `default_budget` when it is absent; None is no budget (up to the context length).
    budget_keys: tuple[str, ...] = ()
    default_budget: int | None = None
    min_budget_key: str | None = None  # the least number of tokens asked for
    # The keys that constrain the output: grammars, `response_format`, tools.
    constraint_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every check reads a generation's prompt and budget: a row without them is a bug.
        if self.generation and not (self.prompt_fields and self.budget_keys):
            raise ValueError(f"generation route {self.path} needs prompt and budget keys")

    @property
    def generation(self) -> bool:
        return self.semantics in (Semantics.MIGRATE, Semantics.STREAM_ERROR)

    # -- the prompt ------------------------------------------------------------------

    def prompt(self, body: dict[str, Any]) -> Any:
        """The prompt as sent: the first prompt field present, or None."""
        for key in self.prompt_fields:
            if key in body:
                return body[key]
        return None

    def prompt_values(self, body: dict[str, Any]) -> list[Any]:
        """Every prompt field's value (None where absent), in the table's order."""
        return [body.get(key) for key in self.prompt_fields]

    def prompt_text(self, body: dict[str, Any]) -> list[Any]:
        """The values whose strings are text tokens: chat messages' string contents and
        `text` parts only (images, audio and video are not text: the engine counts them)."""
        if self.prompt_shape is PromptShape.MESSAGES:
            return [_chat_text(body.get(key)) for key in self.prompt_fields]
        return self.prompt_values(body)

    def prompt_paths(self) -> frozenset[tuple[str, ...]]:
        """Where `prompt_text`'s strings are, from the body's root ("*": any array item)."""
        if self.prompt_shape is PromptShape.MESSAGES:
            return frozenset(
                path
                for key in self.prompt_fields
                for path in ((key, "*", "content"), (key, "*", "content", "*", "text"))
            )
        return frozenset(path for key in self.prompt_fields for path in ((key,), (key, "*")))

    # -- sampling keys ---------------------------------------------------------------

    def params_of(self, body: dict[str, Any]) -> Any:
        """The object holding the sampling keys: the body, or its `params` value as sent
        (a dict, a list of them for a /generate batch, or anything a client sent)."""
        return body if self.params is None else body.get(self.params)

    def _param_dicts(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        params = self.params_of(body)
        return [
            p for p in (params if isinstance(params, list) else [params]) if isinstance(p, dict)
        ]

    def budget(self, body: dict[str, Any]) -> int | None:
        """The requested completion budget as SGLang reads it, None when unbounded."""
        params = self.params_of(body)
        params = params if isinstance(params, dict) else {}
        return as_int(params.get(self.budget_key(body), self.default_budget))

    def budget_key(self, body: dict[str, Any]) -> str:
        """The budget key SGLang reads for this body (see `budget_keys`)."""
        params = self.params_of(body)
        params = params if isinstance(params, dict) else {}
        *earlier, last = self.budget_keys
        return next((key for key in earlier if params.get(key)), last)

    def constraint_values(self, body: dict[str, Any]) -> Any:
        """Every constraint key's value (None where absent); a params value that is not
        an object (a batch's list) as it is."""
        params = self.params_of(body)
        if not isinstance(params, dict):
            return params
        return {key: params.get(key) for key in self.constraint_keys}

    def grammars(self, body: dict[str, Any]) -> list[tuple[str, Any]]:
        """(key, value) of every grammar the engine would compile for this body, a
        `response_format` JSON schema as "json_schema" (to_sampling_params)."""
        found: list[tuple[str, Any]] = []
        for params in self._param_dicts(body):
            found += [
                (k, params[k])
                for k in self.constraint_keys
                if k in GRAMMAR_KEYS and params.get(k) is not None
            ]
            fmt = params.get(FORMAT_KEY) if FORMAT_KEY in self.constraint_keys else None
            if isinstance(fmt, dict):
                spec = fmt.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if schema is not None:
                    found.append(("json_schema", schema))
        return found

    def constrained(self, body: dict[str, Any], grammar_only: bool = False) -> str | None:
        """The first constraint key that binds this body's output, or None: a grammar
        set, a `response_format` other than text, tools not turned off (`grammar_only`:
        not tools, whose answer is free text until the model calls one)."""
        for params in self._param_dicts(body):
            for key in self.constraint_keys:
                if grammar_only and key == TOOLS_KEY:
                    continue
                value = params.get(key)
                if key == FORMAT_KEY:
                    bound = isinstance(value, dict) and value.get("type") not in (None, "text")
                elif key == TOOLS_KEY:
                    bound = bool(value) and params.get("tool_choice") != "none"
                else:
                    bound = bool(value)
                if bound:
                    return key
        return None


def _chat_text(messages: Any) -> list[str]:
    """The text of chat messages: string contents and `text` parts only."""
    out: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [
                p["text"]
                for p in content
                if isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            ]
    return out


_POST = frozenset({"POST"})
_POST_PUT = frozenset({"POST", "PUT"})
_GET = frozenset({"GET", "HEAD"})
# What the OpenAI request models constrain with (protocol.py; see GRAMMAR_KEYS).
_OPENAI_CONSTRAINTS = (*(k for k in GRAMMAR_KEYS if k != "structural_tag"), FORMAT_KEY)


def _unary(
    path: str, kind: str, methods: frozenset[str] = _POST, errors: ErrorShape = ErrorShape.OPENAI
) -> Endpoint:
    return Endpoint(path, kind, methods, Semantics.IDEMPOTENT, errors, json_body=True)


# fmt: off
ROUTES: tuple[Endpoint, ...] = (
    # GenerateReqInput (srt/managers/io_struct.py) with SamplingParams' defaults.
    Endpoint("/generate", GENERATE, _POST_PUT, Semantics.MIGRATE, ErrorShape.NATIVE, True,
             prompt_fields=("text", "input_ids"), params="sampling_params",
             budget_keys=("max_new_tokens",), default_budget=128,
             min_budget_key="min_new_tokens", constraint_keys=GRAMMAR_KEYS),
    # CompletionRequest: `max_tokens: int = 16`.
    Endpoint("/v1/completions", COMPLETIONS, _POST, Semantics.MIGRATE, ErrorShape.OPENAI, True,
             prompt_fields=("prompt",), budget_keys=("max_tokens",), default_budget=16,
             min_budget_key="min_tokens", constraint_keys=_OPENAI_CONSTRAINTS),
    # ChatCompletionRequest.to_sampling_params: `max_completion_tokens or max_tokens`,
    # both None by default. Tools first: a stream with tools is refused for them.
    Endpoint("/v1/chat/completions", CHAT, _POST, Semantics.MIGRATE, ErrorShape.OPENAI, True,
             prompt_fields=("messages",), prompt_shape=PromptShape.MESSAGES,
             budget_keys=("max_completion_tokens", "max_tokens"), min_budget_key="min_tokens",
             constraint_keys=(TOOLS_KEY, *_OPENAI_CONSTRAINTS)),
    # ResponsesRequest: `max_output_tokens: Optional[int] = None`. STREAM_ERROR: the
    # request checks, the warmer and the migrator read MIGRATE rows only.
    Endpoint("/v1/responses", RESPONSES, _POST, Semantics.STREAM_ERROR, ErrorShape.RESPONSES,
             True, prompt_fields=("input",), budget_keys=("max_output_tokens",),
             constraint_keys=("text", TOOLS_KEY)),
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

# The generation rows by kind: what the request checks, the warmer and the migrator read.
GENERATIONS: dict[str, Endpoint] = {e.kind: e for e in ROUTES if e.generation}


def generation(kind: str) -> Endpoint | None:
    """The generation row of this kind, None for any other kind."""
    return GENERATIONS.get(kind)


def lookup(path: str) -> Endpoint | None:
    """The row for an exact request path (before any decoding), or None."""
    found = BY_PATH.get(path)
    if found is None and path.startswith(MODEL_PREFIX):
        parts = path[len(MODEL_PREFIX) :].split("/")
        if all(MODEL_ID.fullmatch(p) for p in parts):
            return MODEL_ROUTE
    return found
