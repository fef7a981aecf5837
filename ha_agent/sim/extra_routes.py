"""The rest of SGLang's public inference API, answered as SGLang 0.5.19 answers it for
a generation model (python/sglang/srt/entrypoints/http_server.py):

- tokenize / detokenize (`serving_tokenize.py`), with the simulator's tokenizer;
- embeddings, rerank, classify, /encode, /classify: a generation model is not an
  embedding model, and SGLang says so with a 400
  (`TokenizerManager._validate_one_request`, managers/tokenizer_manager.py);
- what the simulator cannot do (the Responses API, /v1/score's logprob-based
  scoring) is refused with a 400 that says so, never answered wrongly.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ha_agent.sim.chat_template import render_chat
from ha_agent.sim.responses import native_error, openai_error
from ha_agent.sim.tokenizer import SimTokenizer

NOT_EMBEDDING = (
    "This model does not appear to be an embedding model by default. "
    "Please add `--is-embedding` when launching the server or try another model."
)
Reader = Callable[[web.Request], Awaitable[Any]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(obj).encode(), status=status, content_type="application/json"
    )


def _validation(message: str) -> web.Response:
    """A FastAPI RequestValidationError as SGLang renders it."""
    return _json(openai_error(message, "Bad Request", 400), 400)


def _json_media(request: web.Request) -> web.Response | None:
    """validate_json_request (http_server.py) on the OpenAI routes."""
    media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        return _validation("Unsupported Media Type: Only 'application/json' is allowed")
    return None


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        return _validation(f"Invalid request: JSON decode error: {exc}")
    if not isinstance(body, dict):
        return _validation("Invalid request: the body must be a JSON object")
    return body


async def _openai_body(request: web.Request) -> dict[str, Any] | web.Response:
    bad = _json_media(request)
    return bad if bad is not None else await _body(request)


class ExtraRoutes:
    def __init__(self, tokenizer: SimTokenizer, context_length: int) -> None:
        self.tok = tokenizer
        self.context_length = context_length

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _openai_body(request)
        if isinstance(body, web.Response):
            return body
        prompt, messages = body.get("prompt"), body.get("messages")
        if (prompt is None) == (messages is None):
            return _validation(
                "Value error, Exactly one of 'prompt' or 'messages' must be provided."
            )
        tokens: Any
        count: Any
        if messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return _validation("messages: Input should be a valid list of messages")
            try:
                text = render_chat(messages, bool(body.get("continue_final_message")))
            except ValueError as exc:
                return _json(openai_error(str(exc), "BadRequestError", 400), 400)
            tokens = self.tok.encode(text)
            count = len(tokens)
        elif isinstance(prompt, str):
            tokens = self.tok.encode(prompt)
            count = len(tokens)
        elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            tokens = [self.tok.encode(p) for p in prompt]
            count = [len(t) for t in tokens]
        else:
            return _validation("prompt: Input should be a valid string or list of strings")
        return _json({"tokens": tokens, "count": count, "max_model_len": self.context_length})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _openai_body(request)
        if isinstance(body, web.Response):
            return body
        tokens = body.get("tokens")
        rows = (
            tokens if isinstance(tokens, list) and tokens and isinstance(tokens[0], list) else None
        )
        batch = rows if rows is not None else [tokens]
        if not all(
            isinstance(r, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in r)
            for r in batch
        ):
            return _validation("tokens: Input should be a valid list of integers")
        texts = []
        row: list[int]
        for row in batch:  # type: ignore[assignment]
            try:
                self.tok.check_ids(row)
            except ValueError as exc:
                return _json(openai_error(str(exc), "BadRequestError", 400), 400)
            texts.append(
                self.tok.decode(
                    row, skip_special_tokens=body.get("skip_special_tokens", True) is not False
                )
            )
        return _json({"text": texts if rows is not None else texts[0]})

    async def not_embedding_openai(self, request: web.Request) -> web.Response:
        body = await _openai_body(request)
        if isinstance(body, web.Response):
            return body
        return _json(openai_error(NOT_EMBEDDING, "BadRequestError", 400), 400)

    async def not_embedding_native(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        return _json(native_error(NOT_EMBEDDING), 400)

    async def score(self, request: web.Request) -> web.Response:
        bad = _json_media(request)
        if bad is not None:
            return bad
        msg = "/v1/score (logprob-based scoring) is not supported by the simulator"
        return _json(openai_error(msg, "BadRequestError", 400), 400)

    async def responses(self, request: web.Request) -> web.Response:
        bad = _json_media(request)
        if bad is not None:
            return bad
        error = {
            "message": "the Responses API is not supported by the simulator",
            "type": "invalid_request_error",
            "param": None,
            "code": 400,
        }
        return _json({"error": error}, 400)

    # What SGLang answers a generation model on the embedding routes, by endpoint kind
    # (ha_agent/openapi/endpoints.py; create_app registers them from that table).
    embeddings = classify = rerank = not_embedding_openai
    encode = classify_native = not_embedding_native
