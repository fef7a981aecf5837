"""Response bodies and SSE chunks, shaped like SGLang's.

Sources (sgl-project/sglang, python/sglang/srt/entrypoints/): ``http_server.py``
(``/generate`` events ``data: {json}\\n\\n`` with cumulative text and output_ids, then
``data: [DONE]``), ``openai/serving_completions.py`` (one chunk per update, final usage
chunk dumped with ``exclude_none``), ``openai/serving_chat.py`` + ``openai/sse_utils.py``
(a first ``role`` chunk, content deltas, a separate empty-delta finish chunk, usage chunk;
``StreamDelta`` always carries ``reasoning_content``, null without a reasoning parser),
``openai/usage_processor.py`` (``prompt_tokens_details`` only with cache report and a
non-zero count) and ``openai/protocol.py`` (field names and order).
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus
from typing import Any

from ha_agent.sim.protocol import OpenAICall
from ha_agent.sim.reasoning import reasoning_tokens
from ha_agent.sim.scheduler import Job
from ha_agent.sim.tokenizer import get_tokenizer
from ha_agent.sim.tool_calls import CallItem, new_call_id

DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    # SGLang serialises with orjson / pydantic: compact separators, UTF-8.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def openai_error(message: str, err_type: str, code: int) -> dict[str, Any]:
    """SGLang's ErrorResponse (protocol.py), used by the OpenAI routes and for bad bodies."""
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": code}


def native_error(message: str) -> dict[str, Any]:
    """``_create_error_response`` of http_server.py (used by /generate)."""
    return {"error": {"message": message}}


def generate_payload(job: Job, prompt_token_ids: bool = False) -> dict[str, Any]:
    out = {
        "text": job.detok.visible_text(),
        "output_ids": list(job.output_ids),
        "meta_info": job.meta_info(),
    }
    if prompt_token_ids:  # return_prompt_token_ids: tokenizer_manager.py, every output
        out["prompt_token_ids"] = list(job.req.prompt_ids)
    return out


def engine_abort(job: Job) -> tuple[int, str] | None:
    """(status, message) when the engine itself aborted the request with an error status.

    SGLang turns such a FINISH_ABORT into an HTTP error (non-stream) or an error chunk
    (OpenAI streams); /generate streams pass it on as the last event's finish_reason
    (tokenizer_manager.py _handle_abort_finish_reason).
    """
    reason = job.finish_reason
    if reason is None or reason.get("type") != "abort" or reason.get("status_code") is None:
        return None
    return int(reason["status_code"]), str(reason.get("message") or "Generation aborted.")


def abort_error_body(status: int, message: str) -> dict[str, Any]:
    """The HTTPException(status, message) answer (http_server.py / serving_base.py)."""
    return openai_error(message, str(status), status)


def streaming_error(status: int, message: str) -> bytes:
    """serving_base.create_streaming_error_response: json.dumps, default separators."""
    err = openai_error(message, HTTPStatus(status).name, status)
    return b"data: " + json.dumps({"error": err}).encode() + b"\n\n"


def _details(cached: int) -> dict[str, Any]:
    # PromptTokensDetails (protocol.py), dumped with its null multimodal fields.
    return {
        "cached_tokens": cached,
        "image_tokens": None,
        "audio_tokens": None,
        "video_tokens": None,
    }


def _reasoning_tokens(job: Job) -> int:
    """meta_info.reasoning_tokens: counted only for a thinking chat request
    (GenerateReqInput.require_reasoning, set by serving_chat.py)."""
    if job.req.think is None:
        return 0
    return reasoning_tokens(job.output_ids, get_tokenizer().think_end_id)


def usage(job: Job, cache_report: bool, exclude_none: bool = False) -> dict[str, Any]:
    """UsageInfo (protocol.py); details only with cache report and a cached count > 0."""
    prompt, completion = len(job.req.prompt_ids), len(job.output_ids)
    thought = _reasoning_tokens(job)
    details = _details(job.cached_tokens) if cache_report and job.cached_tokens > 0 else None
    if exclude_none:  # model_dump_json(exclude_none=True), completions' final chunk
        slim = {"cached_tokens": job.cached_tokens} if details else None
        out: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + completion}
        out["completion_tokens"] = completion
        if slim:
            out["prompt_tokens_details"] = slim
        out["reasoning_tokens"] = thought
        return out
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": details,
        "reasoning_tokens": thought,
    }


def _finish(job: Job) -> tuple[str | None, Any]:
    reason = job.finish_reason
    if reason is None:
        return None, None
    return reason["type"], reason.get("matched")


class CompletionFormatter:
    """``/v1/completions``: text deltas, one chunk per engine update."""

    object_name = "text_completion"

    def __init__(self, call: OpenAICall, job: Job, cache_report: bool) -> None:
        self.call = call
        self.job = job
        self.cache_report = cache_report
        self.created = int(time.time())
        self._offset = 0
        self._first = True
        self._ids_sent = 0  # return_token_ids: output ids already in a chunk

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.job.rid,
            "object": self.object_name,
            "created": self.created,
            "model": self.call.model,
        }

    def _delta(self) -> str:
        text = self.job.detok.visible_text()
        delta, self._offset = text[self._offset :], len(text)
        return delta

    def chunks(self) -> list[bytes]:
        aborted = engine_abort(self.job)
        if aborted is not None:  # an error chunk instead of the last output
            return [streaming_error(*aborted)]
        delta = self._delta()
        first, self._first = self._first, False
        if first:
            delta = self.call.echo_text + delta
        reason, matched = _finish(self.job)
        choice: dict[str, Any] = {
            "index": 0,
            "text": delta,
            "logprobs": None,
            "finish_reason": reason,
            "matched_stop": matched,
        }
        if self.call.return_token_ids:
            # serving_completions.py: the ids new since the last chunk, and the prompt's
            # on the first (CompletionResponseStreamChoice drops them when None).
            ids = self.job.output_ids
            choice["token_ids"], self._ids_sent = list(ids[self._ids_sent :]), len(ids)
            if first:
                choice["prompt_token_ids"] = list(self.job.req.prompt_ids)
        chunk = {**self._head(), "choices": [choice], "usage": self._running_usage()}
        return [sse(chunk)]

    def _running_usage(self) -> dict[str, Any] | None:
        # stream_options.continuous_usage_stats: usage on every chunk; completions give no
        # cache details there (serving_completions.py calculate_token_usage).
        return usage(self.job, cache_report=False) if self.call.continuous_usage else None

    def tail(self) -> list[bytes]:
        if not self.call.include_usage:
            return []
        u = usage(self.job, self.cache_report, exclude_none=True)
        return [sse({**self._head(), "choices": [], "usage": u})]

    def response(self) -> dict[str, Any]:
        reason, matched = _finish(self.job)
        choice: dict[str, Any] = {
            "index": 0,
            "text": self.call.echo_text + self.job.detok.visible_text(),
            "logprobs": None,
            "finish_reason": reason,
            "matched_stop": matched,
        }
        if self.call.return_token_ids:
            choice["token_ids"] = list(self.job.output_ids)
            choice["prompt_token_ids"] = list(self.job.req.prompt_ids)
        return {
            **self._head(),
            "choices": [choice],
            "usage": usage(self.job, self.cache_report),
            "metadata": {"weight_version": self.job.weight_version},
        }


class ChatFormatter(CompletionFormatter):
    """``/v1/chat/completions``: role chunk, content deltas, finish chunk, usage chunk.

    With a reasoning parser (``serving_chat._generate_stream_content``) each update's
    delta goes through the parser first: its reasoning part is a chunk of its own
    (``reasoning_content``), then the rest a content chunk, each with running usage;
    what the parser still holds is flushed when the request finishes (not on abort).

    With tool-call parsing on (sim/tool_calls.py, ``_process_tool_call_stream``) the
    rest of the delta goes through the tool-call parser instead of the content path:
    its normal text and each call item are chunks dumped by pydantic
    (``ChatCompletionStreamResponse.model_dump_json``: every delta field, ``usage``
    null without continuous usage); when the request finishes, what the arguments
    still lack follows (``_check_for_unstreamed_tool_args``, no usage) and the finish
    chunk says ``tool_calls`` if a call was sent and the request stopped.
    """

    object_name = "chat.completion.chunk"

    def __init__(self, call: OpenAICall, job: Job, cache_report: bool) -> None:
        super().__init__(call, job, cache_report)
        spec = call.reasoning
        self._parser = spec.detector() if spec is not None and spec.separate else None
        tools = call.tools
        self._tool_parser = tools.detector() if tools is not None and tools.parsing else None
        self._called = False  # has_tool_calls

    def _chunk(
        self,
        delta: dict[str, Any],
        reason: str | None = None,
        matched: Any = None,
        with_usage: bool = False,
    ) -> bytes:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": reason,
            "matched_stop": matched,
        }
        chunk = {**self._head(), "choices": [choice]}
        running = self._running_usage() if with_usage else None
        if running is not None:
            chunk["usage"] = running
        return sse(chunk)

    def _running_usage(self) -> dict[str, Any] | None:
        # Chat's continuous usage carries cache details with cache report on
        # (serving_chat.py _continuous_usage_cached_details).
        return usage(self.job, self.cache_report) if self.call.continuous_usage else None

    def _model_chunk(self, delta: dict[str, Any], with_usage: bool = True) -> bytes:
        """ChatCompletionStreamResponse(...).model_dump_json(): DeltaMessage's fields all
        present, usage null unless continuous."""
        full = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
        choice = {
            "index": 0,
            "delta": {**full, **delta},
            "logprobs": None,
            "finish_reason": None,
            "matched_stop": None,
        }
        running = self._running_usage() if with_usage else None
        return sse({**self._head(), "choices": [choice], "usage": running})

    def _call_chunk(self, item: CallItem, with_usage: bool = True) -> bytes:
        call = {
            "id": new_call_id() if item.name else None,
            "index": item.tool_index,
            "type": "function",
            "function": {"name": item.name, "arguments": item.parameters},
        }
        return self._model_chunk({"tool_calls": [call]}, with_usage)

    def _tool_path(self, delta: str) -> list[bytes]:
        """serving_chat._process_tool_call_stream, then _check_for_unstreamed_tool_args."""
        assert self._tool_parser is not None
        out = []
        normal, calls = self._tool_parser.parse(delta)
        # parse_stream_end on a finish that is no abort: Qwen25Detector keeps the base
        # finish(), which releases nothing.
        if normal:
            out.append(self._model_chunk({"content": normal}))
        for item in calls:
            self._called = True
            out.append(self._call_chunk(item))
        if self.job.finished:
            rest = self._tool_parser.unstreamed_args()
            if rest is not None:
                out.append(self._call_chunk(CallItem(rest[0], None, rest[1]), with_usage=False))
        return out

    def chunks(self) -> list[bytes]:
        aborted = engine_abort(self.job)
        if aborted is not None:  # serving_chat.py: the error chunk, then break
            return [streaming_error(*aborted)]
        out = []
        if self._first:
            self._first = False
            out.append(self._chunk({"reasoning_content": None, "role": "assistant", "content": ""}))
        delta = self._delta()
        if self._parser is not None:
            thought, delta = self._parser.parse(delta)
            if self.job.finished:
                more_thought, more = self._parser.finish()
                thought, delta = thought + more_thought, delta + more
            if thought:
                out.append(self._chunk({"reasoning_content": thought}, with_usage=True))
        if self._tool_parser is not None:
            out += self._tool_path(delta)
        elif delta:  # serving_chat.py: an update whose text delta is empty sends no chunk
            out.append(self._chunk({"reasoning_content": None, "content": delta}, with_usage=True))
        if self.job.finished:
            reason, matched = _finish(self.job)
            if self._called and reason == "stop":
                reason = "tool_calls"
            out.append(self._chunk({"reasoning_content": None}, reason, matched))
        return out

    def tail(self) -> list[bytes]:
        if not self.call.include_usage:
            return []
        return [sse({**self._head(), "choices": [], "usage": usage(self.job, self.cache_report)})]

    def response(self) -> dict[str, Any]:
        reason, matched = _finish(self.job)
        text, thought = self.job.detok.visible_text(), ""
        spec = self.call.reasoning
        if spec is not None and spec.separate:  # _build_chat_response: parse_non_stream
            thought, text = spec.detector().parse_whole(text)
        calls = None
        tools = self.call.tools
        if tools is not None and tools.parsing:  # _process_tool_calls
            detector = tools.detector()
            if detector.has_tool_call(text):
                text, items = detector.parse_whole(text)
                if items:
                    calls = [
                        {
                            "id": new_call_id(),
                            "index": item.tool_index,
                            "type": "function",
                            "function": {"name": item.name, "arguments": item.parameters},
                        }
                        for item in items
                    ]
                    if reason == "stop":
                        reason, matched = "tool_calls", None
        message = {
            "role": "assistant",
            "content": text,
            "reasoning_content": thought or None,
            "tool_calls": calls,
        }
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reason,
            "matched_stop": matched,
        }
        # serving_chat.py _build_chat_response; ChatCompletionResponseChoice drops each
        # when None.
        if self.call.return_prompt_token_ids:
            choice["prompt_token_ids"] = list(self.job.req.prompt_ids)
        if self.call.return_token_ids:
            choice["response_token_ids"] = list(self.job.output_ids)
        if self.call.return_meta_info:
            choice["meta_info"] = self.job.meta_info()
        return {
            **self._head(),
            "object": "chat.completion",
            "choices": [choice],
            "usage": usage(self.job, self.cache_report),
            "metadata": {"weight_version": self.job.weight_version},
        }
