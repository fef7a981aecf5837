"""The checks the relay makes on public requests before an engine sees them.

Why at the relay: what reaches an engine can cost GPU time or, worse, take it down
(a NaN temperature or a negative token id can end in a device-side assert, and a
dead engine means a failover). The relay already parses the JSON of the generation
endpoints, so these checks cost microseconds on data already in hand.

The rule: refuse what would hurt an engine or what the relay cannot relay safely,
never be stricter than SGLang.
- Values are read as SGLang's pydantic request models read them (lax mode):
  `"temperature": "0.5"`, `"max_tokens": "8"`, `"stream": "false"` are coerced in the
  relay's copy (which drives streaming and migration) exactly as SGLang coerces them.
  A value pydantic would refuse is left alone: the engine answers its own 400.
- SamplingParams.verify's ranges are checked with SGLang's words and on each route
  in SGLang's error shape (`{"error": {"message"}}` on native /generate, the OpenAI
  ErrorResponse elsewhere; endpoints.py says which).
- Hard limits SGLang lacks: body size, non-finite numbers in any spelling, nesting
  depth, `n` fan-out, negative token ids, and strings where /generate's
  `sampling_params` needs numbers (SGLang builds a msgspec struct from that dict
  without coercion and fails with a 500, which the relay would otherwise take for a
  node fault).

Paths: only the inference API is public (endpoints.py). Engine admin endpoints are
answered 404 by Nginx and by the relay; Nginx's template has the same list
(tests/unit/test_hardening_nginx.py keeps them equal).
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

from ha_agent.openapi.endpoints import (
    CHAT,
    COMPLETIONS,
    GENERATE,
    MODEL_PREFIX,
    RESPONSES,
    ROUTES,
    Endpoint,
    ErrorShape,
    lookup,
)

__all__ = ["MODEL_PREFIX", "PUBLIC_ROUTES", "BadInput", "check_body", "check_route"]

# Exact public paths and their methods (HEAD is accepted wherever GET is).
PUBLIC_ROUTES: dict[str, frozenset[str]] = {e.path: e.methods for e in ROUTES}

# TokenizerManager._validate_one_request (srt/managers/tokenizer_manager.py), for a
# server started without --enable-custom-logit-processor: the gateway refuses such a
# request with the same words (gateway/admission/policy.py), and so does the simulator.
NO_CUSTOM_LOGIT_PROCESSOR = (
    "The server is not configured to enable custom logit processor. "
    "Please set `--enable-custom-logit-processor` to enable this feature."
)

# OpenAI's own limit on `n`; SGLang has none, and n copies of a request are n requests.
MAX_N = 128
MAX_TOP_LOGPROBS = 20


class BadInput(ValueError):
    """A request the relay answers itself with a 4xx, never sent to an engine.

    `validation` marks what SGLang reports as a RequestValidationError (bad JSON, bad
    types): OpenAI-shaped with type "Bad Request" on every route, /generate included.
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        allow: str | None = None,
        validation: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.allow = allow
        self.validation = validation


def error_body(shape: ErrorShape | None, bad: BadInput) -> dict[str, Any]:
    """The body SGLang would answer for this refusal on a route of this shape."""
    if bad.status == 404:
        return {"detail": "Not Found"}  # Starlette's router (no SGLang handler applies)
    if bad.status == 405:
        return {"detail": "Method Not Allowed"}
    if shape is ErrorShape.RESPONSES:
        error_type = "Bad Request" if bad.validation else "invalid_request_error"
        return {
            "error": {"message": bad.message, "type": error_type, "param": None, "code": bad.status}
        }
    if shape is ErrorShape.NATIVE and not bad.validation and bad.status != 413:
        return {"error": {"message": bad.message}}
    error_type = (
        "Bad Request" if bad.validation else _ERROR_TYPES.get(bad.status, "BadRequestError")
    )
    return {
        "object": "error",
        "message": bad.message,
        "type": error_type,
        "param": None,
        "code": bad.status,
    }


_ERROR_TYPES = {
    413: "RequestTooLarge",
    429: "RateLimitError",
    503: "ServiceUnavailableError",
}


def check_route(method: str, raw_path: str) -> Endpoint:
    """The route's row, or BadInput (404/405) unless `method raw_path` is public.

    `raw_path` is the path as the client sent it (before any decoding), so what is
    checked is exactly what would be forwarded.
    """
    path = raw_path.split("?", 1)[0]
    endpoint = lookup(path)
    if endpoint is None:
        raise BadInput(f"no such endpoint: {path[:200]}", status=404)
    if method not in endpoint.methods:
        allow = ", ".join(sorted(endpoint.methods))
        raise BadInput(f"{method} is not allowed on {path} (allowed: {allow})", 405, allow)
    return endpoint


def _no_constant(name: str) -> Any:
    raise BadInput(f"{name} is not a valid JSON number; numbers must be finite", validation=True)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadInput(
            f"number {text[:40]} is out of range; numbers must be finite", validation=True
        )
    return value


# Built once: json.loads with hooks builds a decoder and its scanner on every call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def parse_json(body: bytes) -> Any:
    """The body as JSON, with every number finite; BadInput with the reason otherwise."""
    try:
        # What json.loads does with bytes: UTF-8, -16 or -32 as the first bytes say.
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except BadInput:
        raise
    except RecursionError:
        raise BadInput("request body is nested too deeply", validation=True) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadInput(f"request body is not valid JSON: {exc}", validation=True) from None


# -- pydantic's lax coercion (the OpenAI models and GenerateReqInput's own fields) ---------

_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)
_INTS = ("max_tokens", "max_completion_tokens", "min_tokens", "top_k", "n", "seed")
_BOOLS = ("stream", "echo", "ignore_eos", "no_stop_trim", "skip_special_tokens")


class _Uncoercible(Exception):
    """pydantic would refuse this value: the engine answers its own 400."""


def _lax_float(value: Any) -> float:
    if isinstance(value, (int, float)):  # bool is an int: pydantic's lax mode agrees
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Uncoercible() from None
    else:
        raise _Uncoercible()
    if not math.isfinite(number):
        raise BadInput(
            f"number {str(value)[:40]} is out of range; numbers must be finite", validation=True
        )
    return number


def _lax_int(value: Any) -> int:
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("+-").isdigit() and len(text) <= 40:
            return int(text)
    raise _Uncoercible()


def _lax_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _Uncoercible()


_COERCED: dict[str, Any] = {
    **dict.fromkeys(_FLOATS, _lax_float),
    **dict.fromkeys(_INTS, _lax_int),
    **dict.fromkeys(_BOOLS, _lax_bool),
}


def _coerce(body: dict[str, Any], key: str, convert: Any) -> None:
    """Replace body[key] with what SGLang's pydantic model would read, if it can."""
    value = body.get(key)
    if value is None:
        return
    with contextlib.suppress(_Uncoercible):
        body[key] = convert(value)


def _coerce_openai(body: dict[str, Any], extra_ints: tuple[str, ...] = ()) -> None:
    for key, convert in _COERCED.items():
        if key in body:  # a request names a few of these twenty: no call for the rest
            _coerce(body, key, convert)
    for key in extra_ints:
        _coerce(body, key, _lax_int)
    options = body.get("stream_options")
    if isinstance(options, dict):
        for key in ("include_usage", "continuous_usage_stats"):
            _coerce(options, key, _lax_bool)


# -- field checks -----------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, where: str) -> float | None:
    """A number the engine will compare (a non-number is no longer in the body: either
    coerced, or left for the engine to refuse)."""
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _integer(body: dict[str, Any], key: str, where: str) -> int | None:
    value = body.get(key)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _strict_numbers(params: dict[str, Any], where: str) -> None:
    """/generate's sampling_params become a msgspec struct without coercion
    (SamplingParams(**kwargs), python/sglang/srt/managers/tokenizer_manager.py): a
    string there raises TypeError in the engine, a 500 the relay would take for a
    node fault. Refused here instead."""
    for key in (*_FLOATS, "max_new_tokens", "min_new_tokens", "top_k", "n", "sampling_seed"):
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadInput(f"{where}{key} must be a number, got {type(value).__name__}")


def _token_ids(value: Any, what: str) -> None:
    """Negative ids reach the embedding lookup: a device-side assert, a dead engine."""
    if not isinstance(value, list):
        return  # not ids at all: the engine's pydantic model refuses it
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and item < 0:
            raise BadInput(f"{what} must hold non-negative integer token ids, got {item!r}"[:200])


def _sampling(body: dict[str, Any], where: str, max_new: int | None, min_key: str) -> None:
    """SGLang's SamplingParams.verify, same order, ranges and messages (which name the
    engine's own fields, max_new_tokens and min_new_tokens, on every route)."""
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
    min_new = _integer(body, min_key, where)
    if min_new is not None and min_new < 0:
        raise BadInput(f"min_new_tokens must be in [0, max_new_tokens], got {min_new}.")
    if max_new is not None:
        if max_new < 0:
            raise BadInput(f"max_new_tokens must be at least 0, got {max_new}.")
        if min_new is not None and min_new > max_new:
            raise BadInput(
                f"min_new_tokens must be in [0, max_new_tokens({max_new})], got {min_new}."
            )
    n = _integer(body, "n", where)
    if n is not None and not 1 <= n <= MAX_N:
        raise BadInput(f"{where}n must be in [1, {MAX_N}], got {n}")
    if body.get("stop_token_ids") is not None:
        _token_ids(body["stop_token_ids"], f"{where}stop_token_ids")
    bias = body.get("logit_bias")
    if isinstance(bias, dict):  # any finite value, as SGLang (Dict[str, float], no range)
        for value in bias.values():
            if isinstance(value, str):
                with contextlib.suppress(_Uncoercible):
                    _lax_float(value)


def _check_generate(body: dict[str, Any]) -> None:
    _coerce(body, "stream", _lax_bool)  # GenerateReqInput is validated by pydantic
    given = [k for k in ("text", "input_ids", "input_embeds") if body.get(k) is not None]
    if not given or len(given) == 3:
        raise BadInput("Either text, input_ids or input_embeds should be provided.")
    ids = body.get("input_ids")
    if isinstance(ids, list):
        if not ids:
            raise BadInput("input_ids cannot be empty.")
        if isinstance(ids[0], list):
            for i, row in enumerate(ids):
                _token_ids(row, f"input_ids[{i}]")
        else:
            _token_ids(ids, "input_ids")
    params = body.get("sampling_params")
    sets = params if isinstance(params, list) else [params]
    for i, one in enumerate(sets):
        if not isinstance(one, dict):
            continue  # None, or a shape the engine's pydantic model refuses
        where = "sampling_params." if not isinstance(params, list) else f"sampling_params[{i}]."
        _strict_numbers(one, where)
        _sampling(one, where, _integer(one, "max_new_tokens", where), "min_new_tokens")


def _check_completions(body: dict[str, Any]) -> None:
    _coerce_openai(body, ("logprobs",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        for i, row in enumerate(prompt):
            _token_ids(row, f"prompt[{i}]")
    else:
        _token_ids(prompt, "prompt")
    # max_tokens <= 0 is refused by CompletionRequest's own validator: the engine's 400.
    _sampling(body, "", _integer(body, "max_tokens", ""), "min_tokens")
    logprobs = _integer(body, "logprobs", "")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise BadInput(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")


def _check_chat(body: dict[str, Any]) -> None:
    _coerce_openai(body, ("top_logprobs",))
    _coerce(body, "logprobs", _lax_bool)
    _coerce(body, "continue_final_message", _lax_bool)
    if body.get("messages") == []:
        raise BadInput("Messages cannot be empty.")  # serving_chat.py _validate_request
    # ChatCompletionRequest.to_sampling_params: max_completion_tokens or max_tokens.
    budget = _integer(body, "max_completion_tokens", "") or _integer(body, "max_tokens", "")
    _sampling(body, "", budget, "min_tokens")
    top = _integer(body, "top_logprobs", "")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadInput(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")


def _check_responses(body: dict[str, Any]) -> None:
    _coerce(body, "stream", _lax_bool)
    for key in ("temperature", "top_p"):
        _coerce(body, key, _lax_float)
    _coerce(body, "max_output_tokens", _lax_int)


_CHECKS = {
    GENERATE: _check_generate,
    COMPLETIONS: _check_completions,
    CHAT: _check_chat,
    RESPONSES: _check_responses,
}


def check_body(kind: str, body: Any) -> dict[str, Any]:
    """The parsed body of a JSON request, coerced as SGLang reads it and checked;
    BadInput if it must not go on. A body that is not an object is passed on
    untouched when the relay needs nothing from it (the engine answers)."""
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object", validation=True)
    check = _CHECKS.get(kind)
    if check is not None:
        check(body)
    return body
