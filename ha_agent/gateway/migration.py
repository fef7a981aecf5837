"""Moving a broken stream to another node so the client's stream continues.

After NVIDIA Dynamo's request migration: the relay re-sends the request with the
output produced so far appended to the prompt and the token budget lowered by
what was already generated, then splices the new stream onto the client's:

- SGLang `/generate`: `input_ids` + output ids so far (exact), or `text` + text so
  far; events stay cumulative over the whole answer (`text`, `output_ids`,
  `meta_info.completion_tokens`), under the original `meta_info.id`.
- `/v1/completions`: prompt + text so far; chunks keep the original `id`.
- `/v1/chat/completions`: the partial answer becomes a final assistant message
  continued with SGLang's `continue_final_message`; the repeated role chunk is
  dropped; chunks keep the original `id`.
Usage counts every token once: the continuation's prompt contains the tokens
already generated, so they move from its prompt count to the completion count.

Refused (the stream ends with an explicit retryable error event instead):
grammar-constrained output (json_schema, regex, ebnf, response_format, tools) —
an engine restarted on prompt + partial output would start a fresh document —
and requests migration cannot express exactly (n > 1, batches, echo).

The first segment is never parsed while it flows: its raw events are kept and
read only if the stream breaks. Continuation segments are rewritten event by
event (ids, cumulative fields, usage).

Token counts for the OpenAI endpoints are counted as content chunks: exact with
SGLang's default `--stream-interval 1`, where each chunk carries one token.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ha_agent.gateway import sse

GENERATE, COMPLETIONS, CHAT = "generate", "completions", "chat"
ENDPOINTS = {"/generate": GENERATE, "/v1/completions": COMPLETIONS, "/v1/chat/completions": CHAT}

_CONSTRAINED_KEYS = ("json_schema", "regex", "ebnf", "structural_tag")


@dataclass
class Progress:
    """What the client has been sent so far, over all segments."""

    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    tokens: int = 0
    finished: bool = False
    response_id: str | None = None
    created: int | None = None
    model: str | None = None
    tool_or_reasoning: bool = False


class Migration:
    """Continuation logic for one streaming request."""

    def __init__(self, kind: str, body: dict[str, Any]) -> None:
        self.kind = kind
        self.body = body
        self.progress = Progress()
        self._base = Progress()  # progress at the start of the current segment
        self.segments = 1
        self._cumulative = True  # /generate without --incremental-streaming-output

    # -- may we? -------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why this request cannot be migrated, or None."""
        b = self.body
        if self.kind == GENERATE:
            params = b.get("sampling_params") or {}
            if not isinstance(params, dict):
                return "sampling_params is not an object"
            if any(params.get(k) for k in _CONSTRAINED_KEYS):
                return "grammar-constrained output cannot be resumed on another engine"
            if int(params.get("n", 1) or 1) != 1:
                return "n > 1"
            if (
                isinstance(b.get("input_ids"), list)
                and b["input_ids"]
                and not isinstance(b["input_ids"][0], int)
            ):
                return "batched input_ids"
            if "input_ids" not in b and not isinstance(b.get("text"), str):
                return "batched or non-text prompt"
        else:
            if any(b.get(k) for k in _CONSTRAINED_KEYS):
                return "grammar-constrained output cannot be resumed on another engine"
            fmt = b.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
                return "grammar-constrained output (response_format) cannot be resumed"
            if int(b.get("n", 1) or 1) != 1:
                return "n > 1"
            if self.kind == COMPLETIONS:
                if not isinstance(b.get("prompt"), str):
                    return "only a single text prompt can be continued"
                if b.get("echo"):
                    return "echo"
            if self.kind == CHAT:
                if b.get("tools") and b.get("tool_choice") != "none":
                    return "tool calls cannot be resumed"
                if self.progress.tool_or_reasoning:
                    return "tool-call or reasoning deltas cannot be resumed"
        return None

    # -- what happened so far ------------------------------------------------------------

    def absorb_first_segment(self, raw: bytes) -> None:
        """Read the unparsed events of the first segment (only when it broke)."""
        for event in sse.iter_json(raw):
            self._track(event)

    def _track(self, event: dict[str, Any]) -> None:
        p = self.progress
        if "error" in event:
            return
        if self.kind == GENERATE:
            meta = event.get("meta_info") or {}
            p.response_id = p.response_id or meta.get("id")
            ids = event.get("output_ids")
            text = event.get("text", "")
            done = meta.get("completion_tokens")
            if isinstance(ids, list) and isinstance(done, int) and done > 1 and self.segments == 1:
                # Cumulative streams repeat every id so far; incremental ones do not.
                self._cumulative = len(ids) == done
            if self._cumulative:
                p.text = self._base.text + (text or "")
                p.output_ids = self._base.output_ids + list(ids or [])
            else:
                p.text += text or ""
                p.output_ids += list(ids or [])
            if isinstance(done, int):
                p.tokens = self._base.tokens + done
            else:
                p.tokens = len(p.output_ids)
            if meta.get("finish_reason"):
                p.finished = True
            return
        p.response_id = p.response_id or event.get("id")
        p.created = p.created or event.get("created")
        p.model = p.model or event.get("model")
        for choice in event.get("choices") or []:
            if self.kind == COMPLETIONS:
                piece = choice.get("text") or ""
            else:
                delta = choice.get("delta") or {}
                piece = delta.get("content") or ""
                if delta.get("tool_calls") or delta.get("reasoning_content"):
                    p.tool_or_reasoning = True
            if piece:
                p.text += piece
                p.tokens += 1
            if choice.get("finish_reason"):
                p.finished = True

    # -- the next segment ----------------------------------------------------------------

    def continuation(self) -> dict[str, Any] | None:
        """The request for the next segment, or None if nothing is left to generate."""
        p = self.progress
        if p.finished:
            return None
        body = copy.deepcopy(self.body)
        if self.kind == GENERATE:
            params = body.setdefault("sampling_params", {})
            left = int(params.get("max_new_tokens", 128) or 128) - p.tokens
            if left <= 0:
                return None
            params["max_new_tokens"] = left
            if params.get("min_new_tokens"):
                params["min_new_tokens"] = max(int(params["min_new_tokens"]) - p.tokens, 0)
            if isinstance(body.get("input_ids"), list):
                body["input_ids"] = list(body["input_ids"]) + p.output_ids
            else:
                body["text"] = str(body.get("text", "")) + p.text
            return body
        key = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        default = 16 if self.kind == COMPLETIONS else None
        limit = body.get(key, default)
        if limit is not None:
            left = int(limit) - p.tokens
            if left <= 0:
                return None
            body[key] = left
        if body.get("min_tokens"):
            body["min_tokens"] = max(int(body["min_tokens"]) - p.tokens, 0)
        if self.kind == COMPLETIONS:
            body["prompt"] = str(body["prompt"]) + p.text
            return body
        messages = list(body.get("messages") or [])
        last = messages[-1] if messages else None
        if (
            body.get("continue_final_message")
            and isinstance(last, dict)
            and last.get("role") == "assistant"
        ):
            messages[-1] = {**last, "content": str(last.get("content") or "") + p.text}
        else:
            messages.append({"role": "assistant", "content": p.text})
        body["messages"] = messages
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        return body

    def resumable_stream_format(self) -> bool:
        # /generate is kept as its latest cumulative event only (see relay.py).
        return self.kind != GENERATE or self._cumulative

    def start_segment(self) -> None:
        self.segments += 1
        self._base = copy.deepcopy(self.progress)

    # -- splicing a continuation onto the client's stream --------------------------------

    def rewrite(self, raw: bytes) -> bytes:
        """Make a continuation segment's events look like the original stream's."""
        out = bytearray()
        base = self._base
        for data in sse.iter_data(raw):
            if data == "[DONE]":
                out += sse.DONE
                continue
            try:
                event = json.loads(data)
            except ValueError:
                out += b"data: " + data.encode() + b"\n\n"
                continue
            if not isinstance(event, dict) or "error" in event:
                out += sse.encode(event) if isinstance(event, dict) else b""
                continue
            if self.kind == GENERATE:
                self._track(event)
                meta = event.setdefault("meta_info", {})
                if self._cumulative:
                    event["text"] = self.progress.text
                    if "output_ids" in event:
                        event["output_ids"] = self.progress.output_ids
                if isinstance(meta.get("completion_tokens"), int):
                    meta["completion_tokens"] += base.tokens
                if isinstance(meta.get("prompt_tokens"), int):
                    meta["prompt_tokens"] = max(meta["prompt_tokens"] - base.tokens, 0)
                if base.response_id:
                    meta["id"] = base.response_id
                finish = meta.get("finish_reason")
                if isinstance(finish, dict) and isinstance(finish.get("length"), int):
                    finish["length"] += base.tokens  # the original budget, not the remainder
                out += sse.encode(event)
                continue
            choices = event.get("choices") or []
            if self.kind == CHAT and choices:
                delta = choices[0].get("delta") or {}
                if "role" in delta:
                    delta.pop("role")
                    if not delta.get("content") and not choices[0].get("finish_reason"):
                        continue  # the client already has its role chunk
            self._track(event)
            if base.response_id:
                event["id"] = base.response_id
            if base.created:
                event["created"] = base.created
            usage = event.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("prompt_tokens"), int):
                    usage["prompt_tokens"] = max(usage["prompt_tokens"] - base.tokens, 0)
                if isinstance(usage.get("completion_tokens"), int):
                    usage["completion_tokens"] += base.tokens
                if isinstance(usage.get("total_tokens"), int):
                    usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage.get(
                        "completion_tokens", 0
                    )
            out += sse.encode(event)
        return bytes(out)

    def closing_events(self) -> bytes:
        """What to send when nothing was left to generate (the break came after the
        last token): the stream's own terminator."""
        return sse.DONE
