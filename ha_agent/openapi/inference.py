"""The public inference surface and the checks the relay makes before an engine sees it.

Why at the relay: what reaches an engine can cost GPU time or, worse, take it down
(a NaN temperature or a negative token id can end in a device-side assert, and a
dead engine means a failover). The relay already parses the JSON of the three
generation endpoints, so these checks cost microseconds on data already in hand.

The rule is: refuse only what SGLang itself refuses (same ranges and wording as
``SamplingParams.verify``), plus what is dangerous although SGLang's lax parsing
would let it through (non-finite numbers in any spelling, numbers sent as strings,
absurd fan-out). Everything else is the engine's call.

Paths: only the inference API is public. Engine admin endpoints (``/pause_generation``,
``/abort_request``, ``/flush_cache``, ``/get_server_info`` with its server arguments,
the simulator's ``/sim/faults``...) are answered 404 by Nginx and by the relay; Nginx's
template has the same list (tests/unit/test_hardening_nginx.py keeps them equal).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Exact public paths and their methods (HEAD is accepted wherever GET is).
PUBLIC_ROUTES: dict[str, frozenset[str]] = {
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    "/v1/embeddings": frozenset({"POST"}),
    "/generate": frozenset({"POST"}),
    "/v1/models": frozenset({"GET", "HEAD"}),
    "/health": frozenset({"GET", "HEAD"}),
    "/health_generate": frozenset({"GET", "HEAD"}),
    "/model_info": frozenset({"GET", "HEAD"}),
    "/get_model_info": frozenset({"GET", "HEAD"}),
}
# `GET /v1/models/{id}`: ids like "Qwen/Qwen2.5-7B-Instruct"; nothing that could be
# read as another path by a server behind us (no dot segments, no escapes).
MODEL_PREFIX = "/v1/models/"
MODEL_ID = re.compile(r"[A-Za-z0-9_:@+-][A-Za-z0-9._:@+-]*")  # no part starts with "."
MODEL_METHODS = frozenset({"GET", "HEAD"})

# OpenAI's own limit on `n`; SGLang has none, and n copies of a request are n requests.
MAX_N = 128
MAX_TOP_LOGPROBS = 20


class BadInput(ValueError):
    """A request the relay answers itself with a 4xx, never sent to an engine."""

    def __init__(self, message: str, status: int = 400, allow: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.allow = allow


def check_route(method: str, raw_path: str) -> None:
    """Raise BadInput (404/405) unless `method raw_path` is part of the public API.

    `raw_path` is the path as the client sent it (before any decoding), so what is
    checked is exactly what would be forwarded.
    """
    path = raw_path.split("?", 1)[0]
    allowed = PUBLIC_ROUTES.get(path)
    if allowed is None and path.startswith(MODEL_PREFIX):
        parts = path[len(MODEL_PREFIX) :].split("/")
        if all(MODEL_ID.fullmatch(p) for p in parts):
            allowed = MODEL_METHODS
    if allowed is None:
        raise BadInput(f"no such endpoint: {path[:200]}", status=404)
    if method not in allowed:
        allow = ", ".join(sorted(allowed))
        raise BadInput(f"{method} is not allowed on {path} (allowed: {allow})", 405, allow)


def _no_constant(name: str) -> Any:
    raise BadInput(f"{name} is not a valid JSON number; numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadInput(f"number {text[:40]} is out of range; numbers must be finite")
    return value


def parse_json(body: bytes) -> Any:
    """The body as JSON, with every number finite; BadInput with the reason otherwise."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
    except BadInput:
        raise
    except RecursionError:
        raise BadInput("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadInput(f"request body is not valid JSON: {exc}") from None


# -- field checks ---------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, where: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{where}{key} must be a number, got {type(value).__name__}")
    return float(value)


def _integer(body: dict[str, Any], key: str, where: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{where}{key} must be an integer, got {type(value).__name__}")
    return value


def _token_ids(value: Any, what: str, allow_empty: bool = True) -> None:
    if not isinstance(value, list):
        raise BadInput(f"{what} must be a list of token ids")
    if not value and not allow_empty:
        raise BadInput(f"{what} must not be empty")  # an empty prompt is no request
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise BadInput(f"{what} must hold non-negative integer token ids, got {item!r}"[:200])


def _sampling(
    body: dict[str, Any], where: str, max_key: str, min_key: str, max_positive: bool
) -> None:
    """SGLang's SamplingParams.verify, same ranges and messages, on one parameter set."""
    temperature = _number(body, "temperature", where)
    if temperature is not None and temperature < 0.0:
        raise BadInput(f"temperature must be a non-negative finite number, got {temperature}.")
    top_p = _number(body, "top_p", where)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise BadInput(f"top_p must be in (0, 1], got {top_p}.")
    min_p = _number(body, "min_p", where)
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise BadInput(f"min_p must be in [0, 1], got {min_p}.")
    top_k = _integer(body, "top_k", where)
    if top_k is not None and top_k < 1 and top_k != -1:
        raise BadInput(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    for key in ("frequency_penalty", "presence_penalty"):
        penalty = _number(body, key, where)
        if penalty is not None and not -2.0 <= penalty <= 2.0:
            raise BadInput(f"{key} must be in [-2, 2], got {penalty}.")
    repetition = _number(body, "repetition_penalty", where)
    if repetition is not None and not 0.0 < repetition <= 2.0:
        raise BadInput(
            f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {repetition}."
        )
    max_new = _integer(body, max_key, where)
    if max_new is not None:
        if max_positive and max_new <= 0:
            raise BadInput(f"{max_key} must be positive")
        if max_new < 0:
            raise BadInput(f"{max_key} must be at least 0, got {max_new}.")
    min_new = _integer(body, min_key, where)
    if min_new is not None and (min_new < 0 or (max_new is not None and min_new > max_new)):
        bound = f"max_new_tokens({max_new})" if max_new is not None else "max_new_tokens"
        raise BadInput(f"{min_key} must be in [0, {bound}], got {min_new}.")
    n = _integer(body, "n", where)
    if n is not None and not 1 <= n <= MAX_N:
        raise BadInput(f"{where}n must be in [1, {MAX_N}], got {n}")
    if body.get("stop_token_ids") is not None:
        _token_ids(body["stop_token_ids"], f"{where}stop_token_ids")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise BadInput(f"{where}logit_bias must be an object of token id -> bias")
        for token, value in bias.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInput(f"{where}logit_bias[{token[:20]!r}] must be a number")
            if not -100.0 <= value <= 100.0:
                raise BadInput(f"{where}logit_bias values must be in [-100, 100], got {value}")


def _stream_flag(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadInput(f"stream must be a boolean, got {type(stream).__name__}")


def _check_generate(body: dict[str, Any]) -> None:
    given = [k for k in ("text", "input_ids", "input_embeds") if body.get(k) is not None]
    if len(given) != 1:
        raise BadInput("Either text, input_ids or input_embeds should be provided (exactly one).")
    text = body.get("text")
    if text is not None and not (
        isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text))
    ):
        raise BadInput("text must be a string or a list of strings")
    ids = body.get("input_ids")
    if ids is not None:
        if isinstance(ids, list) and ids and isinstance(ids[0], list):
            for i, row in enumerate(ids):
                _token_ids(row, f"input_ids[{i}]", allow_empty=False)
        else:
            _token_ids(ids, "input_ids", allow_empty=False)
    params = body.get("sampling_params")
    sets = params if isinstance(params, list) else [params]
    for i, one in enumerate(sets):
        if one is None:
            continue
        if not isinstance(one, dict):
            raise BadInput("sampling_params must be an object (or a list of objects)")
        where = "sampling_params." if not isinstance(params, list) else f"sampling_params[{i}]."
        _sampling(one, where, "max_new_tokens", "min_new_tokens", max_positive=False)


def _check_completions(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise BadInput("prompt is required")
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        _token_ids(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        for i, row in enumerate(prompt):
            _token_ids(row, f"prompt[{i}]", allow_empty=False)
    elif not (
        isinstance(prompt, str)
        or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
    ):
        raise BadInput("prompt must be a string, a list of strings or a list of token ids")
    _openai_common(body)
    _sampling(body, "", "max_tokens", "min_tokens", max_positive=True)
    logprobs = _integer(body, "logprobs", "")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise BadInput(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")


def _check_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadInput("messages must be a list of messages")
    if not messages:
        raise BadInput("Messages cannot be empty.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadInput(f"messages[{i}] must be an object with a string 'role'")
    _openai_common(body)
    _sampling(body, "", "max_tokens", "min_tokens", max_positive=False)
    completion_max = _integer(body, "max_completion_tokens", "")
    if completion_max is not None and completion_max < 0:
        raise BadInput(f"max_completion_tokens must be at least 0, got {completion_max}.")
    top = _integer(body, "top_logprobs", "")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadInput(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")


def _openai_common(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadInput("model must be a string")
    _integer(body, "seed", "")


_CHECKS = {
    "generate": _check_generate,
    "completions": _check_completions,
    "chat": _check_chat,
}


def check_body(kind: str, body: Any) -> dict[str, Any]:
    """The parsed body of a generation request, checked; BadInput if it must not go on.

    `kind` is one of migration.ENDPOINTS' values (generate, completions, chat).
    """
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object")
    _stream_flag(body)
    check = _CHECKS.get(kind)
    if check is not None:
        check(body)
    return body
