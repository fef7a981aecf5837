"""Moving a broken stream to another node so the client's stream continues.

After NVIDIA Dynamo's request migration: the relay re-sends the request with the
output produced so far appended to the prompt and the token budget lowered by
what was already generated, then splices the new stream onto the client's. One
strategy per MIGRATE row of the endpoint table (`_Generate`, `_Completions`, `_Chat`,
registered in `STRATEGIES` by `@strategy(kind)`; a MIGRATE row without one fails at
import) says how; the row says where the prompt, the budget and the constraints are:

- SGLang `/generate`: `input_ids` + the output ids so far (exact token ids; for a text
  prompt too when the client asked `return_prompt_token_ids`, `managers/io_struct.py`,
  which every event then carries), or `text` + the text so far; events stay cumulative
  over the whole
  answer (`text`, `output_ids`, `meta_info.completion_tokens`, the output logprob
  arrays), under the original `meta_info.id`.
- `/v1/completions`: the prompt's token ids + the output's (exact: the relay asks for
  `return_token_ids`, `serving_completions.py`, and cuts the ids off the client's copy
  when the client did not ask), else prompt + text so far; chunks keep the original
  `id`.
- `/v1/chat/completions`: the partial answer becomes a final assistant message
  continued with SGLang's `continue_final_message`; the repeated role chunk is
  dropped; chunks keep the original `id`. A reasoning stream (`--reasoning-parser`)
  continues from the model's own text, rebuilt from the deltas (see `ReasoningFormat`).

Token counts come from the engine, never from counting chunks: SGLang skips chat
chunks whose text delta is empty (`srt/entrypoints/openai/serving_chat.py`) and,
when the reader lags, sends only the latest output, so one chunk carries several
tokens (`out_list[-1]` in `srt/managers/tokenizer_manager.py`). `/generate` events
carry `meta_info.completion_tokens`; on the OpenAI endpoints the relay asks the
engine for `stream_options.continuous_usage_stats` (usage on every content chunk,
`srt/entrypoints/openai/protocol.py`) and strips that usage again when the client
did not ask for it, so the client's stream looks as SGLang would send it for the
client's own options. `include_usage` is left as the client sent it: SGLang ORs it
with its `--stream-response-default-include-usage` (`openai/utils.py`), so the
final usage chunk comes exactly when it would have.

The continuation's budget is the requested one minus the tokens generated so far
(the row's budget key and default, `Endpoint.budget`; a null budget stays null, as
SGLang then runs to the context limit), so the whole answer is at most the
requested length. Spliced usage: the original prompt's tokens, the completion
tokens of all segments summed.

An engine-side abort (`finish_reason` of type `abort` with status 500/503,
`srt/managers/tokenizer_manager.py`; on the OpenAI endpoints an in-band error event
with that code, `serving_chat.py`, `serving_completions.py`) is a node fault: the
relay migrates it like a break. An abort without a status code (the client's own
`/abort_request`), a 400, and the two aborts the request causes itself (see
`REQUEST_CAUSED_ABORTS`) are the request's end and pass through.

Refused (the stream ends with an explicit retryable error event instead):
grammar-constrained output (the row's grammar keys and a `response_format`;
`Endpoint.constrained`) — an engine restarted on prompt + partial output would start a
fresh document —, reasoning when the relay does not know the engines' reasoning parser,
and requests migration cannot express exactly (n > 1, batches, echo).

Tool calls (`--tool-call-parser`): a request with `tools` whose answer so far is text or
reasoning migrates like any other. Once a `tool_calls` delta was sent, the client has a
parsed form of the call, not the model's text (`serving_chat.py`
`_process_tool_call_stream`; the argument fragments are diffs of `json.dumps` of the
partially parsed arguments, `function_call/base_format_detector.py`
`parse_streaming_increment`, which lag the engine's token count by the tokens the
parser still holds). So the continuation resumes from the answer as it stood before the
call's first delta (`Progress.call_start`: its text and the engine's count there) and
the standby writes the call again; its own parser sees the call's start in its output
and streams it as calls. The relay passes on only what the client lacks (`replay`): the
name chunk it already has is dropped, argument fragments are cut to what lies beyond
the client's, the call keeps the first node's id. A continuation that writes a
different call, or text where the call was, ends the stream with the retryable error
(`ContinuationDiverged`); so does a call whose first delta came out of the same engine
output as the text before it (one count on both chunks: no count for the text alone).

The first segment is never parsed while it flows: its raw events are kept and read
only if the stream breaks; the only work per event is a byte search for an abort
and, when the relay added it, cutting the running usage off. Continuation segments
are rewritten event by event (ids, cumulative fields, usage).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ha_agent.gateway.stream import sse
from ha_agent.openapi.endpoints import (
    CHAT,
    COMPLETIONS,
    FORMAT_KEY,
    GENERATE,
    GENERATIONS,
    Endpoint,
    Semantics,
    generation,
)
from ha_agent.openapi.endpoints import as_int as _as_int

# An abort with one of these statuses is the engine's fault (tokenizer_manager.py,
# `_handle_abort_finish_reason`); 400 is the request's, None the client's own abort.
ENGINE_FAULT_STATUS = frozenset({500, 503})
# Engine-side aborts with a 500/503 that the request causes, not the node: another
# node would end it the same way, so they are neither migrated nor retried.
# "Request running timeout reached." (503): SGLANG_REQ_RUNNING_TIMEOUT ran out for this
# request (scheduler.py `_abort_on_running_timeout`); "Out of memory even after
# retracting all other requests" (500): this request alone does not fit the KV pool
# (schedule_batch.py `retract_decode`).
REQUEST_CAUSED_ABORTS = (
    "Request running timeout reached.",
    "Out of memory even after retracting all other requests",
)
_REQUEST_CAUSED_BYTES = tuple(m.encode() for m in REQUEST_CAUSED_ABORTS)


def request_caused(message: Any) -> bool:
    """Is this engine abort's message one the request causes itself?"""
    if isinstance(message, bytes):
        return any(m in message for m in _REQUEST_CAUSED_BYTES)
    return any(m in str(message) for m in REQUEST_CAUSED_ABORTS)


# meta_info arrays that grow with the output (`_INCREMENTAL_STREAMING_META_INFO_KEYS`,
# tokenizer_manager.py) and those about the prompt, which stay the original's.
_OUTPUT_ARRAYS = (
    "output_token_logprobs",
    "output_top_logprobs",
    "output_token_ids_logprobs",
    "output_token_sampling_mask",
    "output_token_sampling_logprobs",
)
_INPUT_ARRAYS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")
_USAGE_KEY = b',"usage":{'
_IDS_KEY = b'token_ids":['
# A completion choice's token id lists (return_token_ids): ints only, no nesting.
_TOKEN_IDS = re.compile(rb',"(?:prompt_)?token_ids":\[[0-9,]*\]')
_FINAL_USAGE = b'"choices":[]'
# The usage object, then the chunk's own closing brace, and nothing after: flat, or
# with flat objects inside (prompt_tokens_details with --enable-cache-report).
# Usage holds names and numbers only, so no brace can hide in a string there. Written
# as runs of non-braces (the "unrolled loop"): sre scans a run in one step, where an
# alternation per byte cost 2.9 µs a chunk against 0.6 (run per streamed event).
_USAGE_LAST = re.compile(rb"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}\}")


class ContinuationRefused(Exception):
    """The engine refused a continuation in-band, before any output of it (SGLang's
    `/generate` stream answers an invalid request with HTTP 200 and an `error` event,
    `http_server.py` `generate_request`): a refusal, not a migrated stream."""


class ContinuationDiverged(ContinuationRefused):
    """A continuation that re-generates a tool call the client already has part of
    wrote a different one (name, arguments, or text before it): the client's stream
    cannot go on as one answer."""


@dataclass
class SentCall:
    """One tool call as the client has it: from its first delta (id, name) and the
    argument fragments since, concatenated."""

    id: Any
    name: str
    arguments: str = ""


@dataclass
class Progress:
    """What the client has been sent so far, over all segments."""

    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] | None = None  # the original prompt's ids, when the engine said
    tokens: int = 0  # completion tokens, as the engine counted them
    prompt_tokens: int | None = None  # the original request's prompt
    finished: bool = False
    final_usage_sent: bool = False
    role_sent: bool = False  # chat: the client has its `role` chunk
    response_id: str | None = None
    created: int | None = None
    model: str | None = None
    tool_calls: bool = False  # chat: a tool_calls delta was sent
    calls: dict[int, SentCall] = field(default_factory=dict)  # chat: by the call's index
    # chat: the answer as it stood before its first tool_calls delta (where a stream
    # with a call in flight resumes), and why it cannot serve, if so
    call_start: Progress | None = None
    call_start_unclear: str | None = None
    reasoning: str = ""  # chat: the reasoning_content sent so far
    reasoning_over: bool = False  # chat: content came after the reasoning
    reasoning_tokens: int = 0  # as the engine counts them (up to and with </think>)
    meta: dict[str, Any] = field(default_factory=dict)  # /generate: the latest meta_info
    arrays: dict[str, list[Any]] = field(default_factory=dict)  # /generate output logprobs

    @property
    def empty(self) -> bool:
        return self.tokens == 0 and not self.text and not self.output_ids


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return f"continuation refused in-band ({error.get('code')}): {error.get('message')}"[:300]
    return f"continuation refused in-band: {error}"[:300]


@dataclass(frozen=True)
class ReasoningFormat:
    """How an engine's `--reasoning-parser` turns the model's text into deltas, so the
    text can be rebuilt for `continue_final_message` (python/sglang/srt/, 0.5.19).

    `parser/reasoning_parser.py`: both detectors split on `<think>` / `</think>`, strip
    the opening tag once and pass everything else through unchanged, so the model's text
    is `start + reasoning + "</think>" + content`. `start` is what the model writes
    itself: Qwen3's template ends the prompt at the assistant turn and the model writes
    `<think>`; DeepSeek-R1's template writes `<think>\n` into the prompt. The continued
    message is the detector's `previous_content` (`ReasoningParser.__init__`): `<think>`
    in it starts the continuation inside the reasoning, `</think>` after it, so the
    continuation's deltas go on where the client's stopped. `toggle` is the
    `chat_template_kwargs` key that turns thinking off (`serving_chat.py`
    `_get_reasoning_from_request`), None when it is always on.
    """

    start: str
    toggle: str | None

    def thinking(self, body: dict[str, Any]) -> bool:
        kwargs = body.get("chat_template_kwargs")
        if self.toggle is None or not isinstance(kwargs, dict):
            return True
        return kwargs.get(self.toggle) is not False

    def text(self, body: dict[str, Any], p: Progress) -> str:
        """The model's text so far, as the engine generated it."""
        if not self.thinking(body) or body.get("separate_reasoning") is False:
            return p.text  # no reasoning, or the tags are in the content already
        if p.reasoning_over or p.text:
            return self.start + p.reasoning + "</think>" + p.text
        return self.start + p.reasoning


REASONING_FORMATS = {
    "qwen3": ReasoningFormat(start="<think>", toggle="enable_thinking"),
    "deepseek-r1": ReasoningFormat(start="", toggle=None),
}


class Migration:
    """Continuation logic for one streaming request."""

    def __init__(self, kind: str, body: dict[str, Any], reasoning_parser: str = "") -> None:
        self.kind = kind
        self.body = body
        # The engines' --reasoning-parser, as far as the relay knows it.
        self.reasoning = REASONING_FORMATS.get(reasoning_parser)
        self.api: Strategy = STRATEGIES[kind]
        self.progress = Progress()
        self._base = Progress()  # progress at the start of the current segment
        self.segments = 1
        # The budget the latest continuation asked for (None: the request as it was).
        self.left: int | None = None
        self._cumulative = True  # /generate without --incremental-streaming-output
        self._seg_usage: int | None = None  # the engine's count in this segment
        self._seg_chunks = 0  # content chunks in this segment (engines without usage)
        self._seg_events = 0  # events a continuation segment has sent the client
        self._seg_text_usage: int | None = None  # the engine's count at the latest text
        self._at_start = Progress()  # progress when the current segment began
        # A segment that re-generates calls the client has part of: per call index, the
        # arguments it has streamed so far; None once it has caught up (or never began).
        self._replay: dict[int, str] | None = None
        self._replay_named: set[int] = set()
        opts = body.get("stream_options")
        self._opts_ok = self.api.openai and (opts is None or isinstance(opts, dict))
        opts = opts if isinstance(opts, dict) else {}
        self.wants_running_usage = bool(opts.get("continuous_usage_stats"))
        self.wants_final_usage = bool(opts.get("include_usage"))
        # Cut the running usage we asked for off the client's copy of the stream.
        self._strip = self._opts_ok and not self.wants_running_usage
        # Token ids the relay asks for (completions' return_token_ids), to cut off again.
        self._ids_added = self.api.wants_ids(body)

    # -- the request the engine sees -----------------------------------------------------

    def upstream(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` with the running usage the relay counts by (OpenAI endpoints) and the
        token ids it continues from (completions)."""
        if (not self._opts_ok or self.wants_running_usage) and not self._ids_added:
            return body
        out = dict(body)
        if self._opts_ok and not self.wants_running_usage:
            out["stream_options"] = {
                **(body.get("stream_options") or {}),
                "continuous_usage_stats": True,
            }
        if self._ids_added:
            out["return_token_ids"] = True
        return out

    def first_body(self, raw: bytes) -> bytes:
        """The first segment's request: the client's bytes, unless the relay adds to it."""
        if (not self._opts_ok or self.wants_running_usage) and not self._ids_added:
            return raw
        return json.dumps(self.upstream(self.body)).encode()

    # -- may we? -------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why this request cannot be migrated, or None."""
        if self.progress.reasoning:
            if self.reasoning is None:
                return "reasoning deltas: the engines' reasoning parser is not configured"
            if self.body.get("continue_final_message"):
                return "reasoning after the client's own continue_final_message"
        return self.api.refusal(self.body, self.progress)

    @property
    def latest_event_holds_all(self) -> bool:
        """Each event repeats the whole answer so far (/generate): the relay keeps only
        the latest of the first segment."""
        return not self.api.openai

    def resumable_stream_format(self) -> bool:
        return not self.latest_event_holds_all or self._cumulative

    # -- what happened so far ------------------------------------------------------------

    def screen(self, out: bytes) -> tuple[bytes, bytes, str | None]:
        """A first-segment buffer of whole events: (the events before any engine abort,
        as received; the same for the client; the abort, or None). Byte searches only,
        unless an abort marker or the added usage is present."""
        abort = None
        if self.api.abort_marker in out:
            out, abort = self._cut_at_abort(out)
        client = self._strip_usage(out) if self._strip and _USAGE_KEY in out else out
        if self._ids_added and _IDS_KEY in client:
            client = _TOKEN_IDS.sub(b"", client)
        return out, client, abort

    def _cut_at_abort(self, out: bytes) -> tuple[bytes, str | None]:
        kept = 0
        for event in out.split(b"\n\n"):
            if self.api.abort_marker in event:
                for obj in sse.iter_json(event):
                    reason = self.api.engine_abort(obj)
                    if reason is not None:
                        return out[:kept], reason
            kept += len(event) + 2
        return out, None

    def _strip_usage(self, out: bytes) -> bytes:
        if out.count(b"\n\n") == 1:  # the usual case: one event
            return self._strip_event(out[:-2]) + b"\n\n"
        return b"\n\n".join(self._strip_event(event) for event in out.split(b"\n\n"))

    def _strip_event(self, event: bytes) -> bytes:
        at = event.rfind(_USAGE_KEY)
        if at < 0 or event[:at].endswith(_FINAL_USAGE):
            return event  # no usage, or the final usage chunk the client asked for
        # SGLang writes usage as the chunk's last key: cut it without parsing the chunk,
        # once sure that the usage object and the chunk's end are all that follow it
        # (a C regex, run per streamed event: no json.loads there).
        if _USAGE_LAST.fullmatch(event, at + 9):
            return event[:at] + self.api.usage_off_for(event) + b"}"
        try:
            whole = event.endswith(b"}") and isinstance(json.loads(event[at + 9 : -1]), dict)
        except ValueError:
            whole = False
        if whole:  # usage nested deeper than SGLang writes it today
            return event[:at] + self.api.usage_off_for(event) + b"}"
        return self._strip_parsed(event)

    def _strip_parsed(self, event: bytes) -> bytes:
        for obj in sse.iter_json(event):
            self.api.drop_usage(obj)
            return sse.encode(obj)[:-2]
        return event

    def absorb_first_segment(self, raw: bytes) -> None:
        """Read the unparsed events of the first segment (only when it broke)."""
        for event in sse.iter_json(raw):
            if "error" not in event:
                self.api.track(self, event)

    def count(self, usage: Any, chunk_has_text: bool) -> None:
        """Completion tokens so far: the engine's usage, else one per content chunk."""
        if isinstance(usage, dict):
            done = _as_int(usage.get("completion_tokens"))
            if done is not None:
                self._seg_usage = done
            self.note_prompt(usage.get("prompt_tokens"))
            self._count_reasoning(_as_int(usage.get("reasoning_tokens")))
        if chunk_has_text:
            self._seg_chunks += 1
        seg = self._seg_usage if self._seg_usage is not None else self._seg_chunks
        self.progress.tokens = self._base.tokens + seg

    def _count_reasoning(self, seg: int | None) -> None:
        """SGLang counts reasoning tokens per request until it generates `</think>`
        (schedule_batch.py `Req.update_reasoning_tokens`): a continuation that starts
        after it counts every token, so once the reasoning ended the count stays."""
        base = self._base
        if seg is not None and not base.reasoning_over:
            self.progress.reasoning_tokens = base.reasoning_tokens + seg

    def note_prompt(self, prompt_tokens: Any) -> None:
        """The original prompt's size: the first segment's, or a resent request's when
        nothing had been generated before it."""
        n = _as_int(prompt_tokens)
        if n is not None and self.progress.prompt_tokens is None and self._base.empty:
            self.progress.prompt_tokens = n

    # -- the next segment ----------------------------------------------------------------

    def budget(self) -> int | None:
        """The requested completion budget, None when unbounded (a null budget)."""
        return self.api.route.budget(self.body)

    @property
    def resume_point(self) -> Progress:
        """Where the next segment starts from: the answer so far, or, once a tool call
        is in flight, the answer before it (the call is written again and the relay
        sends on only what the client lacks, see `replay`)."""
        p = self.progress
        if p.tool_calls and p.call_start is not None:
            return p.call_start
        return p

    def continuation(self) -> dict[str, Any] | None:
        """The request for the next segment, or None if nothing is left to generate."""
        p, r = self.progress, self.resume_point
        if p.finished:
            return None
        self.left = None
        if r.empty:
            return self.upstream(self.body)  # nothing generated: send it again as it was
        limit = self.budget()
        left = None if limit is None else limit - r.tokens
        if left is not None and left <= 0:
            return None
        self.left = left
        body = self.api.continuation(self, copy.deepcopy(self.body), left)
        return self.upstream(body)

    def start_segment(self) -> None:
        self.segments += 1
        self._at_start = copy.deepcopy(self.progress)
        self._begin_segment()

    def retry_segment(self) -> None:
        """The segment's request goes to another node as it was (it sent the client
        nothing): forget what the failed try tracked."""
        self.progress = copy.deepcopy(self._at_start)
        self._begin_segment()

    def _begin_segment(self) -> None:
        p = self.progress
        self._base = copy.deepcopy(p)
        r = self.resume_point
        self._replay, self._replay_named = None, set()
        if r is not p:
            # The segment's tokens count from the resume point; its calls are replayed.
            self._base.tokens = r.tokens
            self._base.reasoning_tokens = r.reasoning_tokens
            self._base.reasoning_over = r.reasoning_over
            self._replay = dict.fromkeys(p.calls, "")
        self._seg_usage, self._seg_chunks, self._seg_events = None, 0, 0
        self._seg_text_usage = None

    def replay(self, choice: dict[str, Any]) -> bool:
        """A chunk of a segment that writes again the calls the client has part of
        (`resume_point`): cut its tool_calls delta to what the client lacks, checking
        that the call is the same (name, arguments so far). True when anything is left
        for the client. Raises ContinuationDiverged when the answers differ."""
        replay = self._replay
        if replay is None:
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content"):
            raise ContinuationDiverged("the continuation wrote text where the tool call was")
        kept = []
        for call in delta.get("tool_calls") or []:
            index = call.get("index")
            sent = self.progress.calls.get(index)
            if sent is None or index not in replay:
                kept.append(call)  # a call the client has nothing of
                continue
            fn = call.get("function") or {}
            if fn.get("name"):
                if fn["name"] != sent.name:
                    raise ContinuationDiverged(
                        f"the continuation called {fn['name']!r}, not {sent.name!r}"
                    )
                self._replay_named.add(index)
            elif index not in self._replay_named:
                raise ContinuationDiverged("the continuation's call has no name")
            old = replay[index]
            new = old + str(fn.get("arguments") or "")
            replay[index] = new
            if not (sent.arguments.startswith(new) or new.startswith(sent.arguments)):
                raise ContinuationDiverged("the continuation's call arguments differ")
            extra = new[max(len(old), len(sent.arguments)) :]
            if extra:  # beyond what the client has: an argument delta of the same call
                kept.append(
                    {**call, "id": None, "function": {**fn, "name": None, "arguments": extra}}
                )
        caught_up = all(
            i in self._replay_named and len(args) >= len(self.progress.calls[i].arguments)
            for i, args in replay.items()
        )
        if choice.get("finish_reason") and not caught_up:
            raise ContinuationDiverged("the continuation ended before the tool call it resumes")
        if caught_up:
            self._replay = None
        if "tool_calls" in delta:
            delta["tool_calls"] = kept or None
        return bool(kept) or bool(choice.get("finish_reason"))

    # -- splicing a continuation onto the client's stream --------------------------------

    def rewrite(self, raw: bytes) -> tuple[bytes, str | None]:
        """Make a continuation segment's events look like the original stream's:
        (the events for the client, an engine abort that ends the segment or None)."""
        out = bytearray()
        for data in sse.iter_data(raw):
            if data == "[DONE]":
                out += sse.DONE
                continue
            try:
                event = json.loads(data)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                out += b"data: " + data.encode() + b"\n\n"
                continue
            reason = self.api.engine_abort(event)
            if reason is not None:
                return bytes(out), reason
            if "error" in event:
                if self._seg_events == 0 and not out:
                    raise ContinuationRefused(_error_text(event["error"]))
                out += sse.encode(event)
                continue
            spliced = self.api.splice(self, event)
            if spliced is not None:
                out += sse.encode(spliced)
                self._seg_events += 1
        return bytes(out), None

    @property
    def base(self) -> Progress:
        return self._base

    def spliced_usage(self, usage: dict[str, Any]) -> None:
        """A continuation's usage over the whole answer: the original prompt, every
        segment's completion tokens."""
        base = self._base
        completion = _as_int(usage.get("completion_tokens"))
        if completion is not None:
            usage["completion_tokens"] = completion + base.tokens
        prompt = _as_int(usage.get("prompt_tokens"))
        if self.progress.prompt_tokens is not None:
            usage["prompt_tokens"] = self.progress.prompt_tokens
        elif prompt is not None:  # an engine without running usage: the old estimate
            usage["prompt_tokens"] = max(prompt - base.tokens, 0)
        if "total_tokens" in usage:
            usage["total_tokens"] = (_as_int(usage.get("prompt_tokens")) or 0) + (
                _as_int(usage.get("completion_tokens")) or 0
            )
        if "reasoning_tokens" in usage:
            usage["reasoning_tokens"] = self.progress.reasoning_tokens

    def closing_events(self) -> bytes:
        """What ends the client's stream when nothing was left to generate (the break
        came after the last token): what the engine would still have sent, then
        [DONE]."""
        return self.api.closing(self) + sse.DONE


STRATEGIES: dict[str, Strategy] = {}  # kind -> its strategy, filled by @strategy
_S = TypeVar("_S", bound="type[Strategy]")


def strategy(kind: str) -> Callable[[_S], _S]:
    """Register the class as the strategy of the endpoint table's MIGRATE row `kind`."""

    def register(cls: _S) -> _S:
        route = generation(kind)
        if route is None or route.semantics is not Semantics.MIGRATE:
            raise ValueError(f"{kind!r} is no MIGRATE row of the endpoint table")
        STRATEGIES[kind] = cls(route)
        return cls

    return register


class Strategy:
    """What differs between the inference endpoints: one instance per MIGRATE row of the
    endpoint table, registered with `@strategy(kind)`; the row (`route`) says where the
    prompt, the budget and the constraints are."""

    openai = True
    abort_marker = b'data: {"error"'  # create_streaming_error_response (serving_base.py)
    usage_off = b""  # how a chunk without running usage ends (see _Chat, _Completions)

    def __init__(self, route: Endpoint) -> None:
        self.route = route

    def refusal(self, body: dict[str, Any], progress: Progress) -> str | None:
        # Tools alone do not refuse: text before a call moves like any other, and a
        # call in flight resumes from before it (the chat strategy's refusal).
        bound = self.route.constrained(body, grammar_only=True)
        if bound == FORMAT_KEY:
            return "grammar-constrained output (response_format) cannot be resumed"
        if bound is not None:
            return "grammar-constrained output cannot be resumed on another engine"
        if (_as_int(body.get("n")) or 1) != 1:
            return "n > 1"
        return None

    def engine_abort(self, event: dict[str, Any]) -> str | None:
        """The engine ended the stream on its own fault (serving_chat.py and
        serving_completions.py turn a 500/503 abort into an error event)."""
        error = event.get("error")
        if (
            isinstance(error, dict)
            and _as_int(error.get("code")) in ENGINE_FAULT_STATUS
            and not request_caused(error.get("message"))
        ):
            return f"engine abort {error.get('code')}: {str(error.get('message'))[:200]}"
        return None

    def wants_ids(self, body: dict[str, Any]) -> bool:
        """Should the relay ask the engine for token ids the client did not ask for?"""
        return False

    def track(self, mig: Migration, event: dict[str, Any]) -> None:
        p = mig.progress
        p.response_id = p.response_id or event.get("id")
        p.created = p.created or event.get("created")
        p.model = p.model or event.get("model")
        choices = event.get("choices") or []
        has_text = False
        for choice in choices:
            piece = self.piece(p, choice)
            if piece:
                p.text += piece
                has_text = True
            if choice.get("finish_reason"):
                p.finished = True
        if not choices and event.get("usage"):
            p.final_usage_sent = True
        mig.count(event.get("usage"), has_text)

    def piece(self, p: Progress, choice: dict[str, Any]) -> str:
        raise NotImplementedError

    def continuation(
        self, mig: Migration, body: dict[str, Any], left: int | None
    ) -> dict[str, Any]:
        raise NotImplementedError

    def set_budget(self, body: dict[str, Any], left: int | None, tokens: int) -> None:
        if body.get("min_tokens"):
            body["min_tokens"] = max((_as_int(body["min_tokens"]) or 0) - tokens, 0)

    def usage_off_for(self, event: bytes) -> bytes:
        return self.usage_off

    def drop_usage(self, event: dict[str, Any]) -> None:
        event.pop("usage", None)

    def splice(self, mig: Migration, event: dict[str, Any]) -> dict[str, Any] | None:
        self.track(mig, event)
        base = mig.base
        if base.response_id:
            event["id"] = base.response_id
        if base.created:
            event["created"] = base.created
        usage = event.get("usage")
        if isinstance(usage, dict):
            if event.get("choices") and not mig.wants_running_usage:
                self.drop_usage(event)
            else:
                mig.spliced_usage(usage)
        return event

    def _head(self, p: Progress, obj: str) -> dict[str, Any]:
        return {
            "id": p.response_id or "",
            "object": obj,
            "created": p.created or 0,
            "model": p.model or "",
        }

    def _usage(self, p: Progress) -> dict[str, Any]:
        prompt = p.prompt_tokens or 0
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + p.tokens,
            "completion_tokens": p.tokens,
            "prompt_tokens_details": None,
            "reasoning_tokens": p.reasoning_tokens,
        }

    def closing(self, mig: Migration) -> bytes:
        raise NotImplementedError


@strategy(COMPLETIONS)
class _Completions(Strategy):
    # CompletionStreamResponse is dumped without exclude_none: "usage":null.
    usage_off = b',"usage":null'

    def refusal(self, body: dict[str, Any], progress: Progress) -> str | None:
        prompt = body.get("prompt")
        ids = isinstance(prompt, list) and bool(prompt) and all(type(t) is int for t in prompt)
        if not isinstance(prompt, str) and not (
            ids and len(progress.output_ids) == progress.tokens
        ):
            return "only a single text prompt, or token ids with the output's, can be continued"
        if body.get("echo"):
            return "echo"
        return super().refusal(body, progress)

    def wants_ids(self, body: dict[str, Any]) -> bool:
        return body.get("stream") is True and not body.get("return_token_ids")

    def piece(self, p: Progress, choice: dict[str, Any]) -> str:
        ids = choice.get("token_ids")  # return_token_ids: the ids new in this chunk
        if isinstance(ids, list):
            p.output_ids += ids
        prompt = choice.get("prompt_token_ids")
        if isinstance(prompt, list) and p.prompt_ids is None:
            p.prompt_ids = prompt
        return str(choice.get("text") or "")

    def drop_usage(self, event: dict[str, Any]) -> None:
        event["usage"] = None

    def continuation(
        self, mig: Migration, body: dict[str, Any], left: int | None
    ) -> dict[str, Any]:
        p = mig.progress
        if left is not None:
            body[self.route.budget_key(body)] = left
        self.set_budget(body, left, p.tokens)
        prompt_ids = body["prompt"] if isinstance(body["prompt"], list) else p.prompt_ids
        if prompt_ids is not None and len(p.output_ids) == p.tokens:
            # Exact: the very ids the engine read and wrote, no tokenizer at the splice.
            body["prompt"] = list(prompt_ids) + p.output_ids
        else:
            body["prompt"] = str(body["prompt"]) + p.text
        return body

    def splice(self, mig: Migration, event: dict[str, Any]) -> dict[str, Any] | None:
        out = super().splice(mig, event)  # tracks the ids first
        for choice in event.get("choices") or []:
            # The continuation's prompt is not the client's (it had the original's in
            # its first chunk); ids the relay asked for the client never did.
            choice.pop("prompt_token_ids", None)
            if mig._ids_added:
                choice.pop("token_ids", None)
        return out

    def closing(self, mig: Migration) -> bytes:
        p = mig.progress
        head = self._head(p, "text_completion")
        out = b""
        if not p.finished:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
            out += sse.encode(
                {**head, "choices": [{**choice, "matched_stop": None}], "usage": None}
            )
        if mig.wants_final_usage and not p.final_usage_sent:
            # The final usage chunk is dumped with exclude_none (serving_completions.py).
            usage = {k: v for k, v in self._usage(p).items() if v is not None}
            out += sse.encode({**head, "choices": [], "usage": usage})
        return out


@strategy(CHAT)
class _Chat(Strategy):
    # StreamChunk (sse_utils.py) omits a None usage; the tool-call parser's chunks
    # (serving_chat.py _process_tool_call_stream, ChatCompletionStreamResponse
    # .model_dump_json) carry every DeltaMessage field, tool_calls included, and
    # "usage":null.
    usage_off = b""
    _DUMPED = b'"tool_calls":'

    def usage_off_for(self, event: bytes) -> bytes:
        return b',"usage":null' if self._DUMPED in event else b""

    def drop_usage(self, event: dict[str, Any]) -> None:
        choices = event.get("choices") or []
        if choices and "tool_calls" in (choices[0].get("delta") or {}):
            event["usage"] = None
        else:
            event.pop("usage", None)

    def refusal(self, body: dict[str, Any], progress: Progress) -> str | None:
        if progress.tool_calls:
            if progress.call_start_unclear:
                return f"a tool call in flight cannot be resumed: {progress.call_start_unclear}"
            if progress.call_start is None:
                return "a tool call in flight cannot be resumed"
        return super().refusal(body, progress)

    def track(self, mig: Migration, event: dict[str, Any]) -> None:
        p = mig.progress
        choices = event.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        usage = event.get("usage")
        done = _as_int(usage.get("completion_tokens")) if isinstance(usage, dict) else None
        if delta.get("tool_calls") and not p.tool_calls:
            # The answer as it stood before the call: the continuation starts there and
            # writes the call again. Exact only if the engine's count there covers the
            # text alone: not when text came out of the same engine output as the
            # call's first delta (both chunks carry that output's count).
            p.call_start = copy.deepcopy(p)
            if done is None:
                p.call_start_unclear = "the engine sent no token count with the call"
            elif mig._seg_text_usage == done:
                p.call_start_unclear = (
                    "the call began in the engine output that carried the text before it"
                )
        super().track(mig, event)
        if delta.get("content") or delta.get("reasoning_content"):
            mig._seg_text_usage = mig._seg_usage
        for call in delta.get("tool_calls") or []:
            fn = call.get("function") or {}
            index = call.get("index")
            if fn.get("name"):
                p.calls[index] = SentCall(call.get("id"), str(fn["name"]))
            if index in p.calls:
                p.calls[index].arguments += str(fn.get("arguments") or "")

    def piece(self, p: Progress, choice: dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        if delta.get("tool_calls"):
            p.tool_calls = True
        thought = delta.get("reasoning_content")
        if thought:
            p.reasoning += str(thought)
        if delta.get("role"):
            p.role_sent = True
        text = str(delta.get("content") or "")
        if text and p.reasoning:
            p.reasoning_over = True
        return text

    def continuation(
        self, mig: Migration, body: dict[str, Any], left: int | None
    ) -> dict[str, Any]:
        if left is not None:
            body[self.route.budget_key(body)] = left
        r = mig.resume_point
        self.set_budget(body, left, r.tokens)
        text = r.text
        if mig.reasoning is not None:
            text = mig.reasoning.text(mig.body, r)
        messages = list(body.get("messages") or [])
        last = messages[-1] if messages else None
        if (
            body.get("continue_final_message")
            and isinstance(last, dict)
            and last.get("role") == "assistant"
        ):
            messages[-1] = {**last, "content": str(last.get("content") or "") + text}
        else:
            messages.append({"role": "assistant", "content": text})
        body["messages"] = messages
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        return body

    def splice(self, mig: Migration, event: dict[str, Any]) -> dict[str, Any] | None:
        choices = event.get("choices") or []
        if choices:
            delta = choices[0].get("delta") or {}
            # One role chunk per answer: a segment sent again after a break before any
            # event keeps its own (the client has none yet). The tool-call parser's
            # chunks carry "role": null (pydantic dumps, serving_chat.py
            # _process_tool_call_stream): those are no role chunk.
            if delta.get("role") and mig.progress.role_sent:
                delta.pop("role")
                if not delta.get("content") and not choices[0].get("finish_reason"):
                    return None  # the client already has its role chunk
            if not mig.replay(choices[0]):
                super().splice(mig, event)  # counted, but the client has it already
                return None
        return super().splice(mig, event)

    def closing(self, mig: Migration) -> bytes:
        p = mig.progress
        head = self._head(p, "chat.completion.chunk")
        out = b""
        if not p.finished:  # build_sse_content's finish chunk (sse_utils.py)
            choice = {
                "index": 0,
                "delta": {"reasoning_content": None},
                "logprobs": None,
                "finish_reason": "length",
                "matched_stop": None,
            }
            out += sse.encode({**head, "choices": [choice]})
        if mig.wants_final_usage and not p.final_usage_sent:
            out += sse.encode({**head, "choices": [], "usage": self._usage(p)})
        return out


@strategy(GENERATE)
class _Generate(Strategy):
    openai = False
    # meta_info.finish_reason of an abort, as orjson writes it (http_server.py).
    abort_marker = b'"type":"abort"'

    def refusal(self, body: dict[str, Any], progress: Progress) -> str | None:
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            return "sampling_params is not an object"
        if self.route.constrained(body) is not None:
            return "grammar-constrained output cannot be resumed on another engine"
        if (_as_int(params.get("n")) or 1) != 1:
            return "n > 1"
        ids = body.get("input_ids")
        if isinstance(ids, list) and ids and not isinstance(ids[0], int):
            return "batched input_ids"
        if "input_ids" not in body and not isinstance(body.get("text"), str):
            return "batched or non-text prompt"
        return None

    def engine_abort(self, event: dict[str, Any]) -> str | None:
        meta = event.get("meta_info")
        finish = meta.get("finish_reason") if isinstance(meta, dict) else None
        if (
            isinstance(finish, dict)
            and finish.get("type") == "abort"
            and _as_int(finish.get("status_code")) in ENGINE_FAULT_STATUS
            and not request_caused(finish.get("message"))
        ):
            return f"engine abort {finish.get('status_code')}: {str(finish.get('message'))[:200]}"
        return None

    def track(self, mig: Migration, event: dict[str, Any]) -> None:
        p, base = mig.progress, mig.base
        meta = event.get("meta_info") or {}
        p.response_id = p.response_id or meta.get("id")
        prompt = event.get("prompt_token_ids")  # return_prompt_token_ids, every event
        if isinstance(prompt, list) and p.prompt_ids is None:
            p.prompt_ids = prompt
        ids = event.get("output_ids")
        text = event.get("text", "")
        done = _as_int(meta.get("completion_tokens"))
        if isinstance(ids, list) and done is not None and done > 1 and mig.segments == 1:
            # Cumulative streams repeat every id so far; incremental ones do not.
            mig._cumulative = len(ids) == done
        if mig._cumulative:
            p.text = base.text + (text or "")
            p.output_ids = base.output_ids + list(ids or [])
            for key in _OUTPUT_ARRAYS:
                if isinstance(meta.get(key), list):
                    p.arrays[key] = base.arrays.get(key, []) + meta[key]
        else:
            p.text += text or ""
            p.output_ids += list(ids or [])
        if done is not None:
            mig._seg_usage = done
        else:
            mig._seg_usage = len(p.output_ids) - len(base.output_ids)
        mig.count(None, False)
        mig.note_prompt(meta.get("prompt_tokens"))
        if mig.segments == 1:
            p.meta = meta
        if meta.get("finish_reason"):
            p.finished = True

    def continuation(
        self, mig: Migration, body: dict[str, Any], left: int | None
    ) -> dict[str, Any]:
        p = mig.progress
        params = body.setdefault("sampling_params", {})
        if left is not None:
            params["max_new_tokens"] = left
        if params.get("min_new_tokens"):
            params["min_new_tokens"] = max((_as_int(params["min_new_tokens"]) or 0) - p.tokens, 0)
        if isinstance(body.get("input_ids"), list):
            # Exact: the engine continues from the very tokens it produced.
            body["input_ids"] = list(body["input_ids"]) + p.output_ids
        elif p.prompt_ids is not None and mig._cumulative:
            # A text prompt as the engine tokenized it: no tokenizer at the splice. text
            # goes: with both, SGLang takes the ids (TokenizerManager._tokenize_one_request)
            # and a request that names one prompt is clearer.
            body.pop("text", None)
            body["input_ids"] = list(p.prompt_ids) + p.output_ids
        else:
            body["text"] = str(body.get("text", "")) + p.text
        return body

    def splice(self, mig: Migration, event: dict[str, Any]) -> dict[str, Any] | None:
        self.track(mig, event)
        p, base = mig.progress, mig.base
        meta = event.setdefault("meta_info", {})
        if mig._cumulative:
            event["text"] = p.text
            if "output_ids" in event:
                event["output_ids"] = p.output_ids
            for key in _OUTPUT_ARRAYS:
                if key in p.arrays and key in meta:
                    meta[key] = p.arrays[key]
            if "output_token_logprobs_length" in meta and "output_token_logprobs" in p.arrays:
                meta["output_token_logprobs_length"] = len(p.arrays["output_token_logprobs"])
        for key in _INPUT_ARRAYS:  # about the original prompt, not prompt + output
            if key in meta and key in base.meta:
                meta[key] = base.meta[key]
        if "prompt_token_ids" in event and p.prompt_ids is not None:
            event["prompt_token_ids"] = p.prompt_ids
        if isinstance(meta.get("completion_tokens"), int):
            meta["completion_tokens"] += base.tokens
        if isinstance(meta.get("prompt_tokens"), int) and p.prompt_tokens is not None:
            meta["prompt_tokens"] = p.prompt_tokens
        if base.response_id:
            meta["id"] = base.response_id
        finish = meta.get("finish_reason")
        if isinstance(finish, dict) and isinstance(finish.get("length"), int):
            finish["length"] += base.tokens  # the original budget, not the remainder
        return event

    def closing(self, mig: Migration) -> bytes:
        p = mig.progress
        if p.finished or not mig._cumulative:
            return b""
        meta = {**p.meta, "id": p.response_id, "completion_tokens": p.tokens}
        meta["finish_reason"] = {"type": "length", "length": mig.budget()}
        if p.prompt_tokens is not None:
            meta["prompt_tokens"] = p.prompt_tokens
        for key, values in p.arrays.items():
            meta[key] = values
        if "output_token_logprobs" in p.arrays:
            meta["output_token_logprobs_length"] = len(p.arrays["output_token_logprobs"])
        return sse.encode({"text": p.text, "output_ids": p.output_ids, "meta_info": meta})


def unmigrated() -> list[str]:
    """The MIGRATE kinds of the endpoint table without a strategy (none, or a bug)."""
    return sorted(
        kind
        for kind, route in GENERATIONS.items()
        if route.semantics is Semantics.MIGRATE and kind not in STRATEGIES
    )


if unmigrated():  # a MIGRATE row needs its strategy before the relay can start
    raise ImportError(f"MIGRATE endpoints without a migration strategy: {unmigrated()}")
