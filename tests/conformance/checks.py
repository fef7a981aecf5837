"""The conformance checks: what SGLang's own tests and its clients rely on, one check
per behaviour, run the same way against an engine and against the gateway.

Written from the behaviours SGLang 0.5.19's tests check (sgl-project/sglang
test/srt/openai_server/basic/test_openai_server.py, test_srt_endpoint.py,
test_abort_request.py, test_skip_tokenizer_init.py, the JSON-constrained and
tool-choice tests, continuous usage stats) and from the `openai` client checklist;
no code copied. Each check asserts what a user would see and returns an
observation (the user-visible facts, without ids or timings) that must be equal
through the gateway and direct.

A check raises `Unsupported` when the engine refuses it as beyond the simulator, and
`Closed` when the route is closed at the gateway on purpose (docs/compatibility.md).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from openai import AsyncOpenAI

Obs = dict[str, Any]


class Unsupported(Exception):
    """The engine (the simulator) refused it as beyond what it can do."""


class Closed(Exception):
    """The gateway keeps this route closed (admin surface)."""


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The `data:` payloads of an SSE body, in order."""
        out = []
        for event in self.body.split(b"\n\n"):
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].strip().decode())
        return out


@dataclass
class Target:
    name: str
    url: str
    session: aiohttp.ClientSession
    # An engine started with --api-key (the stacks' engines are): what a client that
    # talks to SGLang directly presents. The gateway needs none from clients.
    api_key: str | None = None

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(self.auth)
        hdrs.update(headers or {})
        async with self.session.request(method, self.url + path, data=data, headers=hdrs) as r:
            return _screen(Answer(r.status, r.headers, await r.read()))

    def openai(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "none", max_retries=0, timeout=30
        )


def _screen(answer: Answer) -> Answer:
    if answer.status == 400 and b"not supported by the simulator" in answer.body:
        raise Unsupported(answer.body.decode(errors="replace")[:200])
    if answer.status == 404:
        try:
            body = json.loads(answer.body)
        except ValueError:
            body = None
        if body == {"detail": "Not Found"}:  # no such route (here: closed at the gateway)
            raise Closed("404")
    if answer.status == 403 and b"not available through the gateway" in answer.body:
        raise Closed("403")
    return answer


def _openai_unsupported(exc: Exception) -> None:
    if "not supported by the simulator" in str(exc):
        raise Unsupported(str(exc)[:200]) from exc


Check = Callable[[Target], Awaitable[Obs]]
CHECKS: dict[str, Check] = {}


def check(fn: Check) -> Check:
    CHECKS[fn.__name__] = fn
    return fn


CHAT = [{"role": "user", "content": "Tell me about the sea."}]


async def chat(client: AsyncOpenAI, **params: Any) -> Any:
    """The openai client's `chat.completions.create` for CHAT, model "m"."""
    return await client.chat.completions.create(model="m", messages=CHAT, **params)  # type: ignore[arg-type]


# -- native API (test_srt_endpoint.py) -------------------------------------------------


@check
async def generate_text(t: Target) -> Obs:
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}}
    a = await t.call("POST", "/generate", body)
    assert a.status == 200, a.body
    out = a.json()
    meta = out["meta_info"]
    assert isinstance(out["text"], str) and meta["completion_tokens"] <= 8
    return {"text": out["text"], "tokens": meta["completion_tokens"], "ids": out["output_ids"]}


@check
async def generate_put(t: Target) -> Obs:
    body = {"text": "hello", "sampling_params": {"max_new_tokens": 3}}
    a = await t.call("PUT", "/generate", body)
    assert a.status == 200, a.body
    return {"text": a.json()["text"]}


@check
async def generate_stream_cumulative(t: Target) -> Obs:
    body = {"text": "Once upon a time", "stream": True, "sampling_params": {"max_new_tokens": 10}}
    a = await t.call("POST", "/generate", body)
    assert a.status == 200 and a.headers["Content-Type"].startswith("text/event-stream")
    events = a.events()
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    return {"text": texts[-1]}


@check
async def generate_input_ids_output_ids(t: Target) -> Obs:
    """skip-tokenizer-init style: token ids in, token ids out."""
    body = {"input_ids": [10, 11, 12, 13], "sampling_params": {"max_new_tokens": 5}}
    a = await t.call("POST", "/generate", body)
    assert a.status == 200, a.body
    out = a.json()
    assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"]
    return {"ids": out["output_ids"]}


@check
async def generate_ignore_eos_exact_budget(t: Target) -> Obs:
    sp = {"max_new_tokens": 17, "ignore_eos": True}
    a = await t.call("POST", "/generate", {"text": "count", "sampling_params": sp})
    meta = a.json()["meta_info"]
    assert meta["completion_tokens"] == 17 and meta["finish_reason"]["type"] == "length"
    return {"tokens": meta["completion_tokens"]}


@check
async def generate_regex(t: Target) -> Obs:
    sp = {"max_new_tokens": 20, "regex": "(yes|no)"}
    a = await t.call("POST", "/generate", {"text": "Answer:", "sampling_params": sp})
    assert a.status == 200, a.body
    assert a.json()["text"] in ("yes", "no")
    return {"text": a.json()["text"]}


@check
async def generate_native_error_shape(t: Target) -> Obs:
    """SamplingParams.verify's ValueError, as http_server._create_error_response."""
    body = {"text": "x", "sampling_params": {"temperature": -1}}
    a = await t.call("POST", "/generate", body)
    assert a.status == 400 and a.headers["Content-Type"] == "application/json"
    out = a.json()
    assert set(out) == {"error"} and set(out["error"]) == {"message"}
    return {"status": a.status, "body": out}


@check
async def generate_stream_flag_as_string(t: Target) -> Obs:
    """GenerateReqInput is read by pydantic: "false" is False."""
    body = {"text": "hi", "stream": "false", "sampling_params": {"max_new_tokens": 3}}
    a = await t.call("POST", "/generate", body)
    assert a.status == 200 and a.headers["Content-Type"] == "application/json", a.body
    return {"text": a.json()["text"]}


@check
async def generate_no_prompt(t: Target) -> Obs:
    a = await t.call("POST", "/generate", {"sampling_params": {}})
    assert a.status == 400
    return {"status": a.status, "body": a.json()}


@check
async def custom_logit_processor_needs_server_flag(t: Target) -> Obs:
    body = {"text": "x", "custom_logit_processor": "{}", "sampling_params": {"max_new_tokens": 2}}
    a = await t.call("POST", "/generate", body)
    assert a.status == 400 and b"--enable-custom-logit-processor" in a.body
    return {"status": a.status, "body": a.json()}


@check
async def abort_own_request_by_rid(t: Target) -> Obs:
    """test_abort_request.py: a running request aborted by its rid ends with an abort."""
    rid = "conformance-abort-1"
    sp = {"max_new_tokens": 400, "ignore_eos": True}
    body = {"text": "long", "rid": rid, "stream": True, "sampling_params": sp}
    url = t.url + "/generate"
    last: dict[str, Any] = {}
    async with t.session.post(url, json=body, headers=t.auth) as r:
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {")
        abort = await t.call("POST", "/abort_request", {"rid": rid})
        assert abort.status == 200
        for line in (await r.read()).split(b"\n\n"):
            if line.startswith(b"data: {"):
                last = json.loads(line[6:])
    reason = last["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and last["meta_info"]["completion_tokens"] < 400
    return {"finish": reason["type"]}


@check
async def abort_all_is_admin(t: Target) -> Obs:
    a = await t.call("POST", "/abort_request", {"abort_all": True})
    assert a.status == 200
    return {"status": a.status}


@check
async def server_info_is_admin(t: Target) -> Obs:
    a = await t.call("GET", "/get_server_info")
    assert a.status == 200
    return {"status": a.status}


@check
async def flush_cache_is_admin(t: Target) -> Obs:
    a = await t.call("POST", "/flush_cache")
    assert a.status == 200
    return {"status": a.status}


@check
async def unknown_path_404(t: Target) -> Obs:
    async with t.session.get(t.url + "/no/such/path", headers=t.auth) as r:
        assert r.status == 404
        return {"status": r.status, "body": await r.json()}


# -- info routes ---------------------------------------------------------------------------


@check
async def models_and_model_by_id(t: Target) -> Obs:
    models = (await t.call("GET", "/v1/models")).json()
    name = models["data"][0]["id"]
    one = await t.call("GET", f"/v1/models/{name}")
    assert one.status == 200 and one.json()["id"] == name
    missing = await t.call("GET", "/v1/models/no-such-model")
    assert missing.status == 404 and missing.json()["error"]["code"] == "model_not_found"
    return {"ids": [m["id"] for m in models["data"]], "missing": missing.json()}


@check
async def health_and_model_info(t: Target) -> Obs:
    health = await t.call("GET", "/health")
    info = await t.call("GET", "/model_info")
    assert health.status == 200 and info.status == 200
    return {"is_generation": info.json().get("is_generation")}


@check
async def tokenize_detokenize_roundtrip(t: Target) -> Obs:
    for prefix in ("", "/v1"):
        tok = await t.call("POST", f"{prefix}/tokenize", {"prompt": "hello world"})
        assert tok.status == 200, tok.body
        out = tok.json()
        assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
        detok = await t.call("POST", f"{prefix}/detokenize", {"tokens": out["tokens"]})
        assert detok.status == 200 and detok.json()["text"] == "hello world"
    both = await t.call("POST", "/v1/tokenize", {"prompt": "x", "messages": CHAT})
    assert both.status == 400
    return {"tokens": out["tokens"], "both": both.status}


@check
async def embeddings_on_a_generation_model(t: Target) -> Obs:
    a = await t.call("POST", "/v1/embeddings", {"input": "hello", "model": "m"})
    assert a.status == 400 and b"--is-embedding" in a.body
    return {"status": a.status, "body": a.json()}


@check
async def rerank_on_a_generation_model(t: Target) -> Obs:
    a = await t.call("POST", "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert a.status == 400
    return {"status": a.status}


@check
async def score(t: Target) -> Obs:
    body = {"query": "Is it", "items": [" yes", " no"], "label_token_ids": [1, 2]}
    a = await t.call("POST", "/v1/score", body)
    assert a.status == 200, a.body
    return {"status": a.status}


@check
async def responses_api(t: Target) -> Obs:
    a = await t.call("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 8})
    assert a.status == 200, a.body
    return {"status": a.status}


# -- OpenAI API (test_openai_server.py) --------------------------------------------------


@check
async def completion_basic(t: Target) -> Obs:
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "seed": 1}
    a = await t.call("POST", "/v1/completions", body)
    assert a.status == 200, a.body
    out = a.json()
    usage = out["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return {"text": out["choices"][0]["text"], "usage": usage["completion_tokens"]}


@check
async def completion_values_as_strings(t: Target) -> Obs:
    """pydantic's lax mode: "8", "0.5", "false" are read as numbers and booleans."""
    as_strings = {"max_tokens": "8", "temperature": "0.5", "stream": "false"}
    body = {"model": "m", "prompt": "hi", **as_strings}
    a = await t.call("POST", "/v1/completions", body)
    assert a.status == 200 and a.headers["Content-Type"] == "application/json", a.body
    return {"text": a.json()["choices"][0]["text"]}


@check
async def completion_max_tokens_zero(t: Target) -> Obs:
    a = await t.call("POST", "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert a.status == 400 and b"max_tokens must be positive" in a.body
    return {"status": a.status, "type": a.json()["type"]}


@check
async def chat_negative_budget_wording(t: Target) -> Obs:
    a = await t.call("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": -1})
    assert a.status == 400
    out = a.json()
    assert out["param"] is None and a.headers["Content-Type"] == "application/json"
    return {"status": a.status, "body": out}


@check
async def wrong_content_type(t: Target) -> Obs:
    raw = json.dumps({"messages": CHAT}).encode()
    a = await t.call(
        "POST", "/v1/chat/completions", raw=raw, headers={"Content-Type": "text/plain"}
    )
    assert a.status == 400 and b"Unsupported Media Type" in a.body
    return {"status": a.status}


@check
async def chat_openai_client(t: Target) -> Obs:
    client = t.openai()
    r = await chat(client, max_tokens=12, seed=3)
    again = await chat(client, max_tokens=12, seed=3)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == again.choices[0].message.content  # seeded
    assert r.usage is not None and r.usage.completion_tokens <= 12
    return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason}


@check
async def chat_stream_with_usage(t: Target) -> Obs:
    client = t.openai()
    stream = await chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True})
    text, usage, chunks_after_usage = "", None, 0
    async for chunk in stream:
        if usage is not None:
            chunks_after_usage += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and chunks_after_usage == 0, "usage comes last"
    return {"text": text, "completion_tokens": usage.completion_tokens}


@check
async def chat_stream_continuous_usage(t: Target) -> Obs:
    body = {
        "messages": CHAT,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    a = await t.call("POST", "/v1/chat/completions", body)
    events = [json.loads(e) for e in a.events() if e != "[DONE]"]
    content = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert content and all(e.get("usage") for e in content)
    return {"usage": [e["usage"]["completion_tokens"] for e in content]}


@check
async def chat_stop_string(t: Target) -> Obs:
    client = t.openai()
    full = await chat(client, max_tokens=20)
    words = (full.choices[0].message.content or "").split()
    stop = words[3] if len(words) > 4 else "the"
    r = await chat(client, max_tokens=20, stop=[stop])
    content = r.choices[0].message.content or ""
    assert stop not in content
    return {"text": content, "finish": r.choices[0].finish_reason}


@check
async def chat_json_schema(t: Target) -> Obs:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    client = t.openai()
    r = await chat(
        client,
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    value = json.loads(r.choices[0].message.content or "")
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    return {"value": value}


@check
async def chat_tools_auto(t: Target) -> Obs:
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    client = t.openai()
    try:
        r = await chat(client, max_tokens=20, tools=[tool], tool_choice="auto")
    except Exception as exc:
        _openai_unsupported(exc)
        raise
    return {"finish": r.choices[0].finish_reason}


@check
async def chat_penalties(t: Target) -> Obs:
    body = {"messages": CHAT, "max_tokens": 5, "frequency_penalty": 0.5}
    a = await t.call("POST", "/v1/chat/completions", body)
    assert a.status == 200, a.body
    return {"status": a.status}


@check
async def chat_n_two(t: Target) -> Obs:
    a = await t.call("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "n": 2})
    assert a.status == 200 and len(a.json()["choices"]) == 2
    return {"n": 2}


@check
async def stream_early_close(t: Target) -> Obs:
    """A client that leaves mid-stream: the server stays healthy and serves the next."""
    client = t.openai()
    stream = await chat(client, max_tokens=300, stream=True)
    first = None
    async for chunk in stream:
        first = chunk
        break
    await stream.close()
    assert first is not None and first.choices[0].delta.role == "assistant"
    after = await chat(client, max_tokens=2)
    return {"after": after.choices[0].finish_reason}


# -- CORS (SGLang's CORSMiddleware, always on) ---------------------------------------------


@check
async def cors_preflight(t: Target) -> Obs:
    headers = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with t.session.options(
        t.url + "/v1/chat/completions", headers={**t.auth, **headers}
    ) as r:
        assert r.status == 200
        h = r.headers
        assert h["Access-Control-Allow-Origin"] == "https://app.example"
        assert h["Access-Control-Allow-Credentials"] == "true"
        return {k: h.get(k) for k in sorted(h) if k.lower().startswith("access-control-")}


@check
async def cors_simple_request(t: Target) -> Obs:
    async with t.session.get(
        t.url + "/v1/models", headers={**t.auth, "Origin": "https://x.example"}
    ) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        h = r.headers
        return {k: h.get(k) for k in sorted(h) if k.lower().startswith("access-control-")}


async def run(check_fn: Check, target: Target) -> tuple[str, Obs | str]:
    """(verdict, observation or reason): pass, unsupported, closed, or fail."""
    try:
        return "pass", await check_fn(target)
    except Unsupported as exc:
        return "unsupported", str(exc)
    except Closed as exc:
        return "closed", str(exc)
    except Exception as exc:  # a failed assertion, or the client's own error
        return "fail", f"{type(exc).__name__}: {exc}"[:300]
