"""The relay migrating streams whose shape only real SGLang produces.

Two in-process engines play back SGLang-shaped streams (as `python/sglang/srt/...`
0.5.19 writes them, see test_migration.py): chunks that carry several tokens
(`out_list[-1]`, tokenizer_manager.py), tokens without a chunk (empty deltas,
serving_chat.py), running usage only when asked (`continuous_usage_stats`), logprob
arrays in `/generate`'s meta_info. The primary breaks its connection mid-stream; the
standby answers the continuation it is sent, generating exactly the budget it got.
What the client checks: the text, the budget each engine was given, the usage.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ha_agent.gateway.stream.relay import Relay
from tests.support.fakes import relay_over
from tests.unit.test_migration import chat_chunk, chat_usage_chunk, completion_chunk, data, usage

Script = Callable[[dict[str, Any]], list[bytes]]


class Broken(Exception):
    """Raised by a handler after its last event: aiohttp drops the connection."""


@dataclass
class Engine:
    """Plays back one script per request it gets; `None` after the events = break."""

    scripts: list[tuple[Script, bool]]
    bodies: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        script, breaks = self.scripts[len(self.bodies) - 1]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in script(body):
            await resp.write(event)
        if breaks:
            raise Broken()  # the connection ends without the last chunk: a broken stream
        await resp.write_eof()
        return resp

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self.handle)
        return app


@dataclass
class Rig:
    url: str
    primary: Engine
    standby: Engine


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[[Engine, Engine], Any]]:
    servers: list[TestServer] = []
    relays: list[Relay] = []

    async def make(primary: Engine, standby: Engine) -> Rig:
        urls = []
        for engine in (primary, standby):
            server = TestServer(engine.app())
            await server.start_server()
            servers.append(server)
            urls.append(f"http://127.0.0.1:{server.port}")
        relay = relay_over(urls)
        relays.append(relay)
        server = TestServer(relay.app())
        await server.start_server()
        servers.append(server)
        return Rig(f"http://127.0.0.1:{server.port}", primary, standby)

    yield make
    for relay in relays:
        await relay.transport.close()
    for server in servers:
        await server.close()


async def stream(url: str, body: dict[str, Any]) -> list[Any]:
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", url, json=body) as resp,
    ):
        assert resp.status_code == 200
        out = []
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def running(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("continuous_usage_stats"))


def final_usage(body: dict[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


PROMPT_TOKENS = 10


def chat_primary(body: dict[str, Any]) -> list[bytes]:
    assert running(body), "the relay asks the engine for running usage"
    return [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Hello"}, use=usage(PROMPT_TOKENS, 2)),  # two tokens
        # token 3 decoded to "" (a held-back character): SGLang sends no chunk for it
        chat_chunk({"content": " wor"}, use=usage(PROMPT_TOKENS, 5)),
    ]


def chat_standby(body: dict[str, Any]) -> list[bytes]:
    """Generates exactly the budget it was given, three tokens per chunk (it lags)."""
    left = body.get("max_completion_tokens") or body["max_tokens"]
    prompt = 17  # the partial answer re-encoded: not PROMPT_TOKENS + 5
    use = (lambda n: usage(prompt, n)) if running(body) else (lambda n: None)
    out = [chat_chunk({"role": "assistant", "content": ""}, rid="other")]
    texts = ["ld", "!"] + [f" w{i}" for i in range(left)]
    done = 0
    for text in texts:
        done = min(done + 3, left)
        out.append(chat_chunk({"content": text}, use=use(done), rid="other"))
        if done == left:
            break
    out.append(chat_chunk({}, finish="length", rid="other"))
    if final_usage(body):
        out.append(chat_usage_chunk(usage(prompt, left), rid="other"))
    return [*out, b"data: [DONE]\n\n"]


def content(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e["choices"]
    )


async def test_chat_budget_comes_from_the_engines_count_not_the_chunks(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    rig = await rig_factory(Engine([(chat_primary, True)]), Engine([(chat_standby, False)]))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    events = await stream(rig.url + "/v1/chat/completions", {**body, "stream": True})
    sent = rig.standby.bodies[0]
    assert sent["max_tokens"] == 15, "20 - 5 generated (two chunks would have said 18)"
    assert sent["messages"][-1] == {"role": "assistant", "content": "Hello wor"}
    assert content(events).startswith("Hello world!")
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert all("usage" not in e for e in chunks), "usage nobody asked for never shows"
    assert [e for e in chunks if e["choices"][0]["delta"].get("role")] == [chunks[0]]
    assert [e["choices"][0]["finish_reason"] for e in chunks][-1] == "length"
    assert {e["id"] for e in chunks} == {"chatcmpl-1"}


async def test_chat_usage_is_the_original_prompt_and_every_segments_tokens(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    rig = await rig_factory(Engine([(chat_primary, True)]), Engine([(chat_standby, False)]))
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 20,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    events = await stream(rig.url + "/v1/chat/completions", body)
    assert rig.primary.bodies[0]["stream_options"] == body["stream_options"], "as the client sent"
    assert rig.standby.bodies[0]["max_completion_tokens"] == 15
    chunks = events[:-1]
    running_usage = [e["usage"] for e in chunks if e["choices"] and "usage" in e]
    done = [u["completion_tokens"] for u in running_usage]
    assert done == sorted(done) and done[-1] == 20
    assert {u["prompt_tokens"] for u in running_usage} == {PROMPT_TOKENS}
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert chunks[-1]["usage"]["completion_tokens"] == 20
    assert chunks[-1]["usage"]["total_tokens"] == PROMPT_TOKENS + 20


def completions_segment(first: str, done: list[int], breaks_at: int | None) -> Script:
    """A completions stream: cumulative usage `done` per chunk, the budget honoured."""

    def script(body: dict[str, Any]) -> list[bytes]:
        left = body["max_tokens"]
        out = []
        for i, n in enumerate(done):
            n = min(n, left)
            finish = "length" if n == left else None
            use = usage(4, n) if running(body) else None
            out.append(completion_chunk(f"{first}{i}", finish=finish, use=use, rid=f"c-{first}"))
            if finish or (breaks_at is not None and i == breaks_at):
                break
        if breaks_at is None:
            if final_usage(body):
                out.append(data({"id": "x", "choices": [], "usage": usage(4, done[-1])}))
            out.append(b"data: [DONE]\n\n")
        return out

    return script


async def test_completions_budget_holds_over_two_migrations(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    primary = Engine(
        [
            (completions_segment("a", [3, 7], breaks_at=1), True),
            (completions_segment("c", [4, 100], breaks_at=None), False),
        ]
    )
    standby = Engine([(completions_segment("b", [6, 10], breaks_at=1), True)])
    rig = await rig_factory(primary, standby)
    body = {"model": "m", "prompt": "P", "max_tokens": 30, "stream": True}
    events = await stream(rig.url + "/v1/completions", body)
    assert standby.bodies[0]["max_tokens"] == 23 and standby.bodies[0]["prompt"] == "Pa0a1"
    assert primary.bodies[1]["max_tokens"] == 13, "30 - 7 - 10"
    assert primary.bodies[1]["prompt"] == "Pa0a1b0b1"
    chunks = events[:-1]
    assert "".join(e["choices"][0]["text"] for e in chunks) == "a0a1b0b1c0c1"
    assert all(e["usage"] is None for e in chunks), '"usage": null, as SGLang without it'
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert {e["id"] for e in chunks} == {"c-a"}


def generate_segment(ids: list[int], breaks: bool) -> Script:
    """Cumulative /generate events with logprob arrays, two tokens per event."""

    def script(body: dict[str, Any]) -> list[bytes]:
        left = body["sampling_params"]["max_new_tokens"]
        out = []
        for n in range(2, min(len(ids), left) + 1, 2):
            meta = {
                "id": f"g-{ids[0]}",
                "finish_reason": {"type": "length", "length": left} if n == left else None,
                "prompt_tokens": len(body["input_ids"]),
                "completion_tokens": n,
                "input_token_logprobs": [[None, t, None] for t in body["input_ids"]],
                "output_token_logprobs": [[-0.5, t, None] for t in ids[:n]],
                "output_token_logprobs_length": n,
            }
            text = "".join(chr(96 + t % 26) for t in ids[:n])
            out.append(data({"text": text, "output_ids": ids[:n], "meta_info": meta}))
        if not breaks:
            out.append(b"data: [DONE]\n\n")
        return out

    return script


async def test_generate_continues_from_token_ids_with_spliced_logprobs(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    primary = Engine([(generate_segment([1, 2, 3, 4], breaks=True), True)])
    standby = Engine([(generate_segment([5, 6, 7, 8, 9, 10], breaks=False), False)])
    rig = await rig_factory(primary, standby)
    body = {
        "input_ids": [40, 41],
        "stream": True,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 10},
    }
    events = await stream(rig.url + "/generate", body)
    assert standby.bodies[0]["input_ids"] == [40, 41, 1, 2, 3, 4], "the exact ids so far"
    assert standby.bodies[0]["sampling_params"]["max_new_tokens"] == 6
    last = events[-2]
    assert last["output_ids"] == list(range(1, 11))
    assert last["text"] == "abcdefghij"
    meta = last["meta_info"]
    assert meta["id"] == "g-1"
    assert meta["completion_tokens"] == 10 and meta["prompt_tokens"] == 2
    assert meta["finish_reason"] == {"type": "length", "length": 10}
    assert [t[1] for t in meta["output_token_logprobs"]] == list(range(1, 11))
    assert meta["output_token_logprobs_length"] == 10
    assert meta["input_token_logprobs"] == [[None, 40, None], [None, 41, None]]
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))


WORDS = 8  # the answer: w0 .. w7, one token each, max_tokens 8


def _whole_answer(body: dict[str, Any], prompt: int, first: int) -> list[bytes]:
    """SGLang's chat stream from token `first` on, up to the budget: role chunk, one
    content chunk per token (running usage when asked), finish chunk, usage, [DONE]."""
    left = body.get("max_completion_tokens") or body["max_tokens"]
    use = (lambda n: usage(prompt, n)) if running(body) else (lambda n: None)
    out = [chat_chunk({"role": "assistant", "content": ""})]
    for n in range(1, left + 1):
        out.append(chat_chunk({"content": f"w{first + n - 1} "}, use=use(n)))
    out.append(chat_chunk({}, finish="length"))
    if final_usage(body):
        out.append(chat_usage_chunk(usage(prompt, left)))
    return [*out, b"data: [DONE]\n\n"]


def _primary_breaking_after(events: int) -> Script:
    return lambda body: _whole_answer(body, PROMPT_TOKENS, 0)[:events]


def _standby(body: dict[str, Any]) -> list[bytes]:
    """A continuation (the partial answer as the last assistant message) goes on from
    the next word, its prompt re-encoded; a request sent again starts over."""
    messages = body["messages"]
    if body.get("continue_final_message"):
        done = messages[-1]["content"].count("w")
        return _whole_answer(body, PROMPT_TOKENS + 2 * done, done)
    return _whole_answer(body, PROMPT_TOKENS, 0)


@pytest.mark.parametrize("events", range(WORDS + 4))  # role, 8 words, finish, usage
@pytest.mark.parametrize("running_usage", [False, True], ids=["final-usage", "running-usage"])
async def test_a_break_after_any_event_leaves_the_client_the_whole_answer_and_usage(
    rig_factory: Callable[[Engine, Engine], Any], events: int, running_usage: bool
) -> None:
    rig = await rig_factory(
        Engine([(_primary_breaking_after(events), True)]), Engine([(_standby, False)])
    )
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": WORDS,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": running_usage},
    }
    got = await stream(rig.url + "/v1/chat/completions", body)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert content(chunks) == "".join(f"w{i} " for i in range(WORDS))
    assert [c["choices"][0]["delta"].get("role") for c in chunks if c["choices"]].count(
        "assistant"
    ) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    finals = [c["usage"] for c in chunks if not c["choices"]]
    assert len(finals) == 1 and chunks[-1]["choices"] == [], chunks[-3:]
    assert (finals[0]["prompt_tokens"], finals[0]["completion_tokens"]) == (PROMPT_TOKENS, WORDS)
    assert finals[0]["total_tokens"] == PROMPT_TOKENS + WORDS
    # Running usage only when the client asked for it, counting on across the break.
    runs = [c["usage"]["completion_tokens"] for c in chunks if c["choices"] and c.get("usage")]
    assert bool(runs) == running_usage
    if running_usage:
        assert runs == sorted(runs) and runs[-1] == WORDS


def _refuses_in_band(body: dict[str, Any]) -> list[bytes]:
    """SGLang's /generate stream answering an invalid request (http_server.py
    generate_request): HTTP 200, an `error` event with code 400, [DONE]."""
    error = {
        "message": "The input (9000 tokens) is longer than the model's context length.",
        "type": "invalid_request_error",
        "code": 400,
        "retryable": False,
    }
    return [data({"error": error}), b"data: [DONE]\n\n"]


async def test_a_continuation_refused_in_band_is_a_refusal_not_a_migration(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    primary = Engine([(generate_segment([1, 2, 3, 4], breaks=True), True)])
    standby = Engine([(_refuses_in_band, False)] * 8)
    rig = await rig_factory(primary, standby)
    body = {"input_ids": [40, 41], "stream": True, "sampling_params": {"max_new_tokens": 10}}
    events = await stream(rig.url + "/generate", body)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    error = events[-2]["error"]
    assert "retry the request" in error["message"], "the relay's own retryable end"
    assert "refused in-band" in error["message"] and "context length" in error["message"]
    assert not [e for e in events[:-2] if "error" in e], "SGLang's 400 is not passed on"
    assert events[-3]["output_ids"] == [1, 2, 3, 4]
    assert standby.bodies[0]["input_ids"] == [40, 41, 1, 2, 3, 4]


PROMPT_IDS = [101, 102, 103]


def _completion_ids(first: int, count: int, prompt_ids: list[int] | None) -> list[bytes]:
    """Completion chunks with SGLang's return_token_ids fields (serving_completions.py):
    each chunk the ids new since the last, the first chunk the prompt's too."""
    out = []
    for n in range(count):
        chunk = json.loads(completion_chunk(f" t{first + n}", use=usage(3, n + 1))[6:])
        chunk["choices"][0]["token_ids"] = [first + n]
        if n == 0 and prompt_ids is not None:
            chunk["choices"][0]["prompt_token_ids"] = prompt_ids
        out.append(data(chunk))
    return out


def _completion_primary(body: dict[str, Any]) -> list[bytes]:
    assert body["return_token_ids"] is True, "the relay asks for the ids it continues from"
    return _completion_ids(0, 4, PROMPT_IDS)


def _completion_standby(body: dict[str, Any]) -> list[bytes]:
    left = body["max_tokens"]
    chunks = _completion_ids(4, left, list(body["prompt"]))
    return [*chunks, completion_chunk("", finish="length"), b"data: [DONE]\n\n"]


async def test_completions_continue_from_the_token_ids_not_the_text(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    """No tokenizer at the splice: the standby gets the prompt's ids as the engine
    tokenized it plus the output's ids; the client, who did not ask, sees no ids."""
    rig = await rig_factory(
        Engine([(_completion_primary, True)]), Engine([(_completion_standby, False)])
    )
    body = {"model": "m", "prompt": "p q", "max_tokens": 10, "stream": True}
    events = await stream(rig.url + "/v1/completions", body)
    sent = rig.standby.bodies[0]
    assert sent["prompt"] == [*PROMPT_IDS, 0, 1, 2, 3] and sent["max_tokens"] == 6
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "".join(f" t{i}" for i in range(10))
    assert all(
        "token_ids" not in c["choices"][0] and "prompt_token_ids" not in c["choices"][0]
        for c in chunks
    )


def _completion_primary_asked(body: dict[str, Any]) -> list[bytes]:
    return _completion_ids(0, 4, PROMPT_IDS)


async def test_completions_ids_a_client_asked_for_stay_the_originals(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    rig = await rig_factory(
        Engine([(_completion_primary_asked, True)]), Engine([(_completion_standby, False)])
    )
    body = {"prompt": "p q", "max_tokens": 10, "stream": True, "return_token_ids": True}
    events = await stream(rig.url + "/v1/completions", body)
    choices = [e["choices"][0] for e in events[:-1] if e["choices"]]
    assert [t for c in choices for t in c.get("token_ids", [])] == list(range(10))
    assert [c["prompt_token_ids"] for c in choices if "prompt_token_ids" in c] == [PROMPT_IDS]


def _generate_with_prompt_ids(first: int, count: int, prompt_ids: list[int]) -> list[bytes]:
    """Cumulative /generate events carrying `prompt_token_ids` (return_prompt_token_ids,
    tokenizer_manager.py: every output)."""
    out = []
    for n in range(1, count + 1):
        ids = list(range(first, first + n))
        meta = {"id": "g-9", "finish_reason": None, "prompt_tokens": len(prompt_ids)}
        meta["completion_tokens"] = n
        event = {"text": "x" * n, "output_ids": ids, "meta_info": meta}
        out.append(data({**event, "prompt_token_ids": prompt_ids}))
    return out


def _generate_text_primary(body: dict[str, Any]) -> list[bytes]:
    return _generate_with_prompt_ids(0, 3, PROMPT_IDS)


def _generate_ids_standby(body: dict[str, Any]) -> list[bytes]:
    left = body["sampling_params"]["max_new_tokens"]
    events = _generate_with_prompt_ids(3, left, body["input_ids"])
    return [*events, b"data: [DONE]\n\n"]


async def test_a_generate_text_prompt_continues_from_the_prompt_ids_the_client_asked(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    rig = await rig_factory(
        Engine([(_generate_text_primary, True)]), Engine([(_generate_ids_standby, False)])
    )
    body = {
        "text": "p q",
        "stream": True,
        "return_prompt_token_ids": True,
        "sampling_params": {"max_new_tokens": 8},
    }
    events = await stream(rig.url + "/generate", body)
    sent = rig.standby.bodies[0]
    assert "text" not in sent and sent["input_ids"] == [*PROMPT_IDS, 0, 1, 2]
    assert sent["sampling_params"]["max_new_tokens"] == 5
    assert events[-2]["output_ids"] == list(range(8))
    assert {tuple(e["prompt_token_ids"]) for e in events[:-1]} == {tuple(PROMPT_IDS)}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def _tool_primary(calls: bool) -> Script:
    """A chat stream with tools: text first, then (if `calls`) the first tool_calls delta
    as serving_chat.py `_process_tool_call_stream` sends it (id and name, no arguments)."""

    def script(body: dict[str, Any]) -> list[bytes]:
        out = [
            chat_chunk({"role": "assistant", "content": ""}),
            chat_chunk({"content": "Let me check."}, use=usage(PROMPT_TOKENS, 4)),
        ]
        if calls:
            call = {
                "id": "call_0",
                "index": 0,
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
            out.append(chat_chunk({"tool_calls": [call]}, use=usage(PROMPT_TOKENS, 12)))
        return out

    return script


def _tool_standby(body: dict[str, Any]) -> list[bytes]:
    left = body["max_tokens"]
    return [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": " Sunny."}, use=usage(PROMPT_TOKENS + 4, left)),
        chat_chunk({}, finish="stop"),
        b"data: [DONE]\n\n",
    ]


def _tool_call_standby(body: dict[str, Any]) -> list[bytes]:
    """The same call written again, under an id of its own (serving_chat.py
    `_process_tool_call_id`: a fresh uuid per call)."""
    call = {"index": 0, "type": "function"}
    return [
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk(
            {
                "tool_calls": [
                    {**call, "id": "call_9", "function": {"name": "get_weather", "arguments": ""}}
                ]
            },
            use=usage(PROMPT_TOKENS + 4, 8),
        ),
        chat_chunk(
            {"tool_calls": [{**call, "id": None, "function": {"name": None, "arguments": "{}"}}]},
            use=usage(PROMPT_TOKENS + 4, 10),
        ),
        chat_chunk({}, finish="tool_calls"),
        b"data: [DONE]\n\n",
    ]


async def test_a_tool_call_in_flight_resumes_from_the_text_before_it(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    """The standby is asked for the answer from before the call (the budget counted
    from there) and writes the call again; the client gets its name once, under the
    first node's id, and only the arguments it lacked."""
    rig = await rig_factory(
        Engine([(_tool_primary(True), True)]), Engine([(_tool_call_standby, False)])
    )
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    events = await stream(
        rig.url + "/v1/chat/completions", {**body, "max_tokens": 30, "stream": True}
    )
    sent = rig.standby.bodies[0]
    assert sent["messages"][-1] == {"role": "assistant", "content": "Let me check."}
    assert sent["continue_final_message"] is True and sent["max_tokens"] == 26
    calls = [
        call
        for e in events[:-1]
        if e["choices"]
        for call in e["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", "get_weather", ""),
        (None, None, "{}"),
    ]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_continuation_that_answers_in_text_where_the_call_was_ends_with_the_error(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    rig = await rig_factory(Engine([(_tool_primary(True), True)]), Engine([(_tool_standby, False)]))
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    events = await stream(
        rig.url + "/v1/chat/completions", {**body, "max_tokens": 30, "stream": True}
    )
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]["message"]
    assert "retry the request" in error and "text where the tool call was" in error
    assert content(events[:-2]) == "Let me check.", "nothing of the other answer reached it"


async def test_a_tools_request_still_answering_in_text_migrates(
    rig_factory: Callable[[Engine, Engine], Any],
) -> None:
    rig = await rig_factory(
        Engine([(_tool_primary(False), True)]), Engine([(_tool_standby, False)])
    )
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    events = await stream(
        rig.url + "/v1/chat/completions", {**body, "max_tokens": 30, "stream": True}
    )
    sent = rig.standby.bodies[0]
    assert sent["tools"] == TOOLS and sent["continue_final_message"] is True
    assert sent["messages"][-1] == {"role": "assistant", "content": "Let me check."}
    assert sent["max_tokens"] == 26
    assert content(events) == "Let me check. Sunny."
