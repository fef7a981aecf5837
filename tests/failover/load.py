"""Continuous, bounded load from the official `openai` client: streaming and not.

Every request is recorded with its outcome, timings and the node that served it
(the relay's X-SGLang-HA-Node header). The simulator is deterministic, so every
answer is also compared with a reference text and usage taken before any fault: a
migrated stream must read exactly like an uninterrupted one (byte identity is the
simulator's; on SGLang a migrated stream is a continuation, docs/failover.md) and
count its tokens as the engine did (the original prompt, the requested budget).

With the engines' `--reasoning-parser` on (`--reasoning-parser` of `python -m
tests.failover`), the text compared is the reasoning, then `</think>`, then the
content, the usage includes `reasoning_tokens`, and a stream whose reasoning deltas do
not all come before its content is a mismatch.

With `tools` (`--tool-call-parser` of `python -m tests.failover`), half the prompts
carry a tool, so its answers are a call: the text compared is each call as
`<call>name arguments</call>` (the id is a fresh uuid per answer on SGLang, so it is not
compared). The words before a call are not compared: SGLang strips them in a
non-stream answer and not in a stream, and its stream parser drops those that share an
update with `<tool_call>` (serving_chat.py, function_call/base_format_detector.py). A
stream the relay ends with its explicit retryable error because a tool call was in
flight (`gateway/stream/migration.py`) is recorded as `refused`, not as a failure.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import openai
from openai import AsyncStream
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

PROMPTS = [
    "Explain leader leases in two sentences.",
    "Write a haiku about GPUs.",
    "What is a fencing token?",
    "List three causes of a failover.",
    "Describe Redis Sentinel briefly.",
    "Why do streams need migration?",
    "Summarise the CAP theorem.",
    "Name a good default for a lease TTL.",
]
MAX_TOKENS = 48
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"topic": {"type": "string", "maxLength": 12}},
                "required": ["topic"],
            },
        },
    }
]
# The relay's words when it ends a stream it cannot move (gateway/stream/relay.py).
REFUSED = "the stream cannot move"
# httpx's words for a connection the server closed before any byte of the answer.


@dataclass
class RequestRecord:
    start: float
    end: float
    stream: bool
    ok: bool
    node: str | None
    error: str | None = None
    ttft: float | None = None
    max_gap: float | None = None
    text_matches: bool | None = None
    usage_matches: bool | None = None  # (prompt, completion) tokens as the reference's
    completion_tokens: int | None = None
    # (prompt, completion, reasoning) tokens as received, and as the reference's
    usage: tuple[int, int, int] | None = None
    usage_expected: tuple[int, int, int] | None = None
    reasoning: bool = False  # the answer carried reasoning_content
    tools: bool = False  # the request carried tools
    tool_calls: bool = False  # the answer carried a tool call
    refused: bool = False  # a stream the relay ended with its retryable error (not moved)

    @property
    def latency(self) -> float:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _usage(usage: CompletionUsage) -> tuple[int, int, int]:
    # SGLang's UsageInfo.reasoning_tokens is no OpenAI field: the client keeps it as extra.
    reasoning = (usage.model_extra or {}).get("reasoning_tokens") or 0
    return usage.prompt_tokens, usage.completion_tokens, int(reasoning)


def _joined(reasoning: str, content: str) -> str:
    return f"{reasoning}</think>{content}" if reasoning else content


def _message_calls(message: Any) -> list[tuple[str, str]]:
    return [
        (c.function.name, c.function.arguments)
        for c in message.tool_calls or []
        if getattr(c, "function", None) is not None
    ]


def _extra(obj: Any, key: str) -> str:
    return str((getattr(obj, "model_extra", None) or {}).get(key) or "")


def _messages(i: int) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def _answer_text(reasoning: str, content: str, calls: list[tuple[str, str]]) -> str:
    """What is compared with the reference: with a call, the reasoning and the calls."""
    if not calls:
        return _joined(reasoning, content)
    called = "".join(f"<call>{name} {arguments}</call>" for name, arguments in calls)
    return _joined(reasoning, called)


class Load:
    def __init__(
        self,
        base_url: str,
        concurrency: int = 8,
        stream_every: int = 2,
        max_requests: int = 20000,
        clock_zero: float | None = None,
        api_key: str = "unused",
        tools: bool = False,
    ) -> None:
        # api_key: the gateway's client key where it requires one (docs/security.md).
        self.client = openai.AsyncOpenAI(
            base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60.0
        )
        self.concurrency = concurrency
        self.stream_every = stream_every
        self.max_requests = max_requests
        self.zero = clock_zero if clock_zero is not None else time.monotonic()
        self.records: list[RequestRecord] = []
        # By (prompt, stream): SGLang answers a tool call cut off by max_tokens
        # differently in the two (a stream has sent the call's deltas so far; a whole
        # answer's parser finds no complete call and returns the text before it,
        # stripped: function_call/qwen25_detector.py detect_and_parse), so each kind of
        # answer is compared with an unbroken answer of its own kind.
        self.references: dict[tuple[int, bool], str] = {}
        self.reference_usage: dict[int, tuple[int, int, int]] = {}
        self._issued = 0
        self.tools = tools

    def _tools(self, prompt: int) -> dict[str, Any]:
        # Prompts 0, 1, 4, 5: streams (even requests) and non-stream ones both get some.
        return {"tools": TOOLS} if self.tools and (prompt // 2) % 2 == 0 else {}

    def now(self) -> float:
        return time.monotonic() - self.zero

    async def take_references(self) -> None:
        for i in range(len(PROMPTS)):
            reply = await self.client.chat.completions.create(
                model="default",
                messages=_messages(i),
                max_tokens=MAX_TOKENS,
                temperature=0,
                seed=i,
                **self._tools(i),
            )
            message = reply.choices[0].message
            self.references[(i, False)] = _answer_text(
                _extra(message, "reasoning_content"), message.content or "", _message_calls(message)
            )
            if reply.usage is not None:
                self.reference_usage[i] = _usage(reply.usage)
            self.references[(i, True)], *_ = await self._stream(i, self.now())

    async def _one(self, i: int, stream: bool) -> RequestRecord:
        start = self.now()
        prompt = i % len(PROMPTS)
        node = None
        usage: CompletionUsage | None = None
        try:
            if stream:
                seen: dict[str, str | None] = {}  # the node, known even if the stream fails
                try:
                    text, node, ttft, gap, usage = await self._stream(prompt, start, seen)
                finally:
                    node = seen.get("node")
                rec = RequestRecord(start, self.now(), True, True, node, ttft=ttft, max_gap=gap)
                rec.reasoning = "</think>" in text
                rec.tool_calls = "<call>" in text
            else:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model="default",
                    messages=_messages(prompt),
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                    seed=prompt,
                    **self._tools(prompt),
                )
                node = raw.headers.get("x-sglang-ha-node")
                reply = raw.parse()
                message = reply.choices[0].message
                reasoning = _extra(message, "reasoning_content")
                calls = _message_calls(message)
                text = _answer_text(reasoning, message.content or "", calls)
                usage = reply.usage
                rec = RequestRecord(start, self.now(), False, True, node, reasoning=bool(reasoning))
                rec.tool_calls = bool(calls)
        except (openai.APIError, openai.APIConnectionError, asyncio.TimeoutError) as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            return RequestRecord(
                start,
                self.now(),
                stream,
                False,
                node,
                error=f"{type(exc).__name__}: {exc}{cause}"[:300],
                tools=bool(self._tools(prompt)),
                refused=stream and REFUSED in str(exc),
            )
        rec.tools = bool(self._tools(prompt))
        if (prompt, stream) in self.references:
            rec.text_matches = text == self.references[(prompt, stream)]
        if usage is not None:
            rec.completion_tokens = usage.completion_tokens
            if prompt in self.reference_usage:
                got = _usage(usage)
                rec.usage, rec.usage_expected = got, self.reference_usage[prompt]
                rec.usage_matches = got == rec.usage_expected
        else:
            rec.usage_matches = False  # asked for and missing
        return rec

    async def _stream(
        self, prompt: int, start: float, seen: dict[str, str | None] | None = None
    ) -> tuple[str, str | None, float, float, CompletionUsage | None]:
        pieces: list[str] = []
        thoughts: list[str] = []
        calls: dict[int, tuple[str, str]] = {}  # tool_calls deltas by call index
        in_order = True  # every reasoning delta before any content
        usage: CompletionUsage | None = None
        last = start
        ttft: float | None = None
        gap = 0.0
        finished = False
        async with self.client.chat.completions.with_streaming_response.create(
            model="default",
            messages=_messages(prompt),
            max_tokens=MAX_TOKENS,
            temperature=0,
            seed=prompt,
            stream=True,
            stream_options={"include_usage": True},
            **self._tools(prompt),
        ) as response:
            node = response.headers.get("x-sglang-ha-node")
            if seen is not None:
                seen["node"] = node
            chunks: AsyncStream[ChatCompletionChunk] = await response.parse()
            async for chunk in chunks:
                now = self.now()
                if ttft is None:
                    ttft = now - start
                gap = max(gap, now - last)
                last = now
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    thought = _extra(choice.delta, "reasoning_content")
                    if thought:
                        thoughts.append(thought)
                        in_order = in_order and not any(pieces)
                    pieces.append(choice.delta.content or "")
                    for call in choice.delta.tool_calls or []:
                        name, args = calls.get(call.index, ("", ""))
                        fn = call.function
                        if fn is not None:
                            name, args = name + (fn.name or ""), args + (fn.arguments or "")
                        calls[call.index] = (name, args)
                    finished = finished or choice.finish_reason is not None
        if not finished:
            raise openai.APIError("stream ended without a finish_reason", None, body=None)  # type: ignore[arg-type]
        text = _answer_text("".join(thoughts), "".join(pieces), [calls[i] for i in sorted(calls)])
        if not in_order:
            text = "(reasoning after content) " + text  # never equal to the reference
        return text, node, ttft or 0.0, gap, usage

    async def _worker(self, worker: int, stop: asyncio.Event) -> None:
        n = worker
        while not stop.is_set() and self._issued < self.max_requests:
            self._issued += 1
            stream = (n % self.stream_every) == 0
            self.records.append(await self._one(n, stream))
            n += self.concurrency

    async def run(self, stop: asyncio.Event) -> list[RequestRecord]:
        await asyncio.gather(*(self._worker(w, stop) for w in range(self.concurrency)))
        return self.records

    async def close(self) -> None:
        await self.client.close()
