"""Migration accounting on SGLang-shaped streams (the relay's `migration.py`).

The events are written as SGLang 0.5.19 serialises them (paths `python/sglang/...`):
chat chunks by `srt/entrypoints/openai/sse_utils.py` (msgspec, `reasoning_content`
always present, usage omitted when None), completion chunks by pydantic
(`"usage":null` when none), `/generate` events by `srt/entrypoints/http_server.py`
(cumulative `text`, `output_ids` and meta_info arrays). They carry what the
simulator cannot show: chunks that coalesce several tokens (`out_list[-1]` in
`srt/managers/tokenizer_manager.py`), tokens without a chunk (empty deltas skipped
in `serving_chat.py`), logprob arrays, and engine aborts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ha_agent.gateway.stream import sse
from ha_agent.gateway.stream.migration import ContinuationRefused, Migration
from ha_agent.openapi.endpoints import CHAT, COMPLETIONS, GENERATE

RID = "chatcmpl-1"


def data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def events(raw: bytes) -> list[Any]:
    return [json.loads(d) if d != "[DONE]" else d for d in sse.iter_data(raw)]


def usage(prompt: int, completion: int) -> dict[str, Any]:
    # UsageInfo (protocol.py) as calculate_token_usage builds it.
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "reasoning_tokens": 0,
    }


def chat_chunk(
    delta: dict[str, Any],
    finish: str | None = None,
    use: dict[str, Any] | None = None,
    rid: str = RID,
) -> bytes:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": 100,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"reasoning_content": None, **delta},
                "logprobs": None,
                "finish_reason": finish,
                "matched_stop": None,
            }
        ],
    }
    if use is not None:
        chunk["usage"] = use
    return data(chunk)


def chat_usage_chunk(use: dict[str, Any], rid: str = RID) -> bytes:
    head = {"id": rid, "object": "chat.completion.chunk", "created": 100, "model": "m"}
    return data({**head, "choices": [], "usage": use})


def completion_chunk(
    text: str, finish: str | None = None, use: dict[str, Any] | None = None, rid: str = "cmpl-1"
) -> bytes:
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "matched_stop": None,
    }
    head = {"id": rid, "object": "text_completion", "created": 100, "model": "m"}
    return data({**head, "choices": [choice], "usage": use})


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra}


def first_segment(mig: Migration, raw: bytes) -> bytes:
    """Run raw through the relay's first-segment path; return what the client got."""
    kept, client, abort = mig.screen(raw)
    assert abort is None
    mig.absorb_first_segment(kept)
    return client


def migrate(mig: Migration) -> dict[str, Any]:
    body = mig.continuation()
    assert body is not None
    mig.start_segment()
    return body


# -- the OpenAI endpoints: counts from the engine's usage ------------------------------


def test_chat_counts_coalesced_chunks_and_skipped_deltas_from_usage() -> None:
    mig = Migration(CHAT, chat_body(max_tokens=20))
    upstream = json.loads(mig.first_body(b"{}"))
    assert upstream["stream_options"] == {"continuous_usage_stats": True}
    first = (
        chat_chunk({"role": "assistant", "content": ""})
        + chat_chunk({"content": "Hello"}, use=usage(10, 1))
        + chat_chunk({"content": " wor"}, use=usage(10, 3))  # two tokens in one chunk
        # token 4 decoded to "" (a partial character): no chunk at all
        + chat_chunk({"content": "ld"}, use=usage(10, 5))
    )
    first_segment(mig, first)
    assert mig.progress.text == "Hello world"
    assert mig.progress.tokens == 5, "five tokens in three content chunks"
    assert mig.progress.prompt_tokens == 10
    body = migrate(mig)
    assert body["max_tokens"] == 15, "the budget left is 20 - 5"
    assert body["stream_options"] == {"continuous_usage_stats": True}
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello world"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False

    # The standby re-encodes the partial answer: its prompt count differs (13, not 15).
    second = (
        chat_chunk({"role": "assistant", "content": ""}, rid="other")
        + chat_chunk({"content": "!"}, use=usage(13, 2), rid="other")
        + chat_chunk({"content": " Bye"}, use=usage(13, 15), rid="other")
        + chat_chunk({}, finish="length", rid="other")
    )
    out, abort = mig.rewrite(second)
    assert abort is None
    got = events(out)
    assert [e["choices"][0]["delta"].get("content") for e in got] == ["!", " Bye", None]
    assert all("usage" not in e for e in got), "the client did not ask for running usage"
    assert {e["id"] for e in got} == {RID}
    assert mig.progress.tokens == 20


def test_final_usage_is_the_original_prompt_and_all_completion_tokens() -> None:
    mig = Migration(
        CHAT, chat_body(max_completion_tokens=30, stream_options={"include_usage": True})
    )
    assert json.loads(mig.first_body(b"{}"))["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    first_segment(
        mig,
        chat_chunk({"role": "assistant", "content": ""})
        + chat_chunk({"content": "abc"}, use=usage(10, 7)),
    )
    body = migrate(mig)
    assert body["max_completion_tokens"] == 23
    out, _ = mig.rewrite(
        chat_chunk({"content": "d"}, use=usage(17, 23), rid="x")
        + chat_chunk({}, finish="length", rid="x")
        + chat_usage_chunk(usage(17, 23), rid="x")
        + sse.DONE
    )
    final = events(out)[-2]
    assert final["choices"] == []
    assert final["usage"]["prompt_tokens"] == 10, "the original prompt, not the re-encoded one"
    assert final["usage"]["completion_tokens"] == 30, "7 + 23: exactly the requested budget"
    assert final["usage"]["total_tokens"] == 40
    assert events(out)[-1] == "[DONE]"


def test_budget_holds_over_two_migrations() -> None:
    mig = Migration(COMPLETIONS, {"model": "m", "prompt": "p", "max_tokens": 30, "stream": True})
    first_segment(
        mig,
        completion_chunk("a", use=usage(4, 3)) + completion_chunk("bc", use=usage(4, 7)),
    )
    body = migrate(mig)
    assert body["max_tokens"] == 23 and body["prompt"] == "pabc"
    out, _ = mig.rewrite(
        completion_chunk("d", use=usage(9, 4), rid="y")
        + completion_chunk("ef", use=usage(9, 10), rid="y")
    )
    assert [e["usage"] for e in events(out)] == [None, None], "usage as the client asked: null"
    body = migrate(mig)
    assert body["max_tokens"] == 13, "30 - 7 - 10"
    assert body["prompt"] == "pabcdef"
    out, _ = mig.rewrite(completion_chunk("g", finish="length", use=usage(19, 13), rid="z"))
    assert mig.progress.tokens == 30
    assert mig.progress.finished


def test_client_asking_for_running_usage_gets_it_spliced() -> None:
    opts = {"include_usage": False, "continuous_usage_stats": True}
    body = {"prompt": "p", "max_tokens": 9, "stream": True, "stream_options": opts}
    mig = Migration(COMPLETIONS, {**body, "return_token_ids": True})
    raw = completion_chunk("a", use=usage(4, 2))
    assert mig.first_body(b"raw") == b"raw", "the client's own request goes up unchanged"
    added = json.loads(Migration(COMPLETIONS, body).first_body(b"raw"))
    assert added == {**body, "return_token_ids": True}, "the ids the relay continues from"
    assert first_segment(mig, raw) == raw
    migrate(mig)
    out, _ = mig.rewrite(completion_chunk("b", use=usage(6, 3), rid="q"))
    assert events(out)[0]["usage"] == usage(4, 5)


def test_stripped_stream_is_what_sglang_sends_without_running_usage() -> None:
    """The client's bytes equal SGLang's for the client's own options."""
    mig = Migration(CHAT, chat_body(stream_options={"include_usage": True}))
    with_usage = (
        chat_chunk({"role": "assistant", "content": ""})
        + chat_chunk({"content": "x"}, use=usage(3, 1))
        + chat_chunk({}, finish="stop")
        + chat_usage_chunk(usage(3, 2))
        + sse.DONE
    )
    without = (
        chat_chunk({"role": "assistant", "content": ""})
        + chat_chunk({"content": "x"})
        + chat_chunk({}, finish="stop")
        + chat_usage_chunk(usage(3, 2))
        + sse.DONE
    )
    assert mig.screen(with_usage)[1] == without

    mig = Migration(COMPLETIONS, {"prompt": "p", "stream": True})
    assert mig.screen(completion_chunk("x", use=usage(3, 1)))[1] == completion_chunk("x")
    # Usage with cached-token details (--enable-cache-report) is cut the same way.
    detailed = {**usage(3, 1), "prompt_tokens_details": {"cached_tokens": 2}}
    assert mig.screen(completion_chunk("x", use=detailed))[1] == completion_chunk("x")
    # Usage that is not the chunk's last key (not SGLang's order): parsed, not cut blind.
    odd = b'data: {"id":"c","usage":{"prompt_tokens":3},"extra":{"a":1},"choices":[]}\n\n'
    (stripped,) = events(mig.screen(odd)[1])
    assert not stripped.get("usage") and stripped["extra"] == {"a": 1}


def test_engine_without_running_usage_falls_back_to_counting_chunks() -> None:
    mig = Migration(CHAT, chat_body(max_tokens=10))
    first_segment(mig, chat_chunk({"content": "a"}) + chat_chunk({"content": "b"}))
    assert mig.progress.tokens == 2
    assert migrate(mig)["max_tokens"] == 8


def test_nothing_generated_resends_the_request_and_keeps_one_role_chunk() -> None:
    mig = Migration(CHAT, chat_body(max_tokens=5))
    first_segment(mig, chat_chunk({"role": "assistant", "content": ""}))
    body = migrate(mig)
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["max_tokens"] == 5 and "continue_final_message" not in body
    out, _ = mig.rewrite(
        chat_chunk({"role": "assistant", "content": ""}, rid="r2")
        + chat_chunk({"content": "a"}, use=usage(8, 1), rid="r2")
    )
    assert [e["choices"][0]["delta"] for e in events(out)] == [
        {"reasoning_content": None, "content": "a"}
    ]
    assert mig.progress.prompt_tokens == 8


def test_chat_null_budget_stays_null() -> None:
    mig = Migration(CHAT, chat_body(max_tokens=None))
    first_segment(mig, chat_chunk({"content": "a"}, use=usage(3, 4)))
    body = migrate(mig)
    assert body["max_tokens"] is None, "SGLang runs a null budget to the context length"
    assert "max_completion_tokens" not in body


def test_break_after_the_last_token_ends_the_stream_well_formed() -> None:
    mig = Migration(CHAT, chat_body(max_tokens=3, stream_options={"include_usage": True}))
    first_segment(mig, chat_chunk({"content": "abc"}, use=usage(5, 3)))
    assert mig.continuation() is None, "nothing left to generate"
    closing = events(mig.closing_events())
    assert closing[0]["choices"][0]["finish_reason"] == "length"
    assert closing[0]["id"] == RID
    assert closing[1]["usage"] == usage(5, 3)
    assert closing[-1] == "[DONE]"


# -- engine aborts ------------------------------------------------------------------------


NODE_ABORT = "Retraction host KV pool exhausted. Aborting the request."  # retract_decode


def sglang_error(code: int, name: str, message: str = NODE_ABORT) -> bytes:
    # create_streaming_error_response (serving_base.py) uses json.dumps' default spacing.
    error = {"object": "error", "message": message, "type": name}
    return (
        b"data: " + json.dumps({"error": {**error, "param": None, "code": code}}).encode() + b"\n\n"
    )


def test_engine_abort_on_an_openai_stream_is_a_break() -> None:
    mig = Migration(CHAT, chat_body(stream_options={"include_usage": True}))
    before = chat_chunk({"content": "a"}, use=usage(3, 1))
    raw = (
        before
        + sglang_error(500, "INTERNAL_SERVER_ERROR")
        + chat_usage_chunk(usage(3, 1))
        + sse.DONE
    )
    kept, client, abort = mig.screen(raw)
    assert abort is not None and "500" in abort
    assert kept == before, "nothing from the abort on reaches the client"
    assert client == chat_chunk({"content": "a"})


def test_a_400_error_event_is_the_requests_answer_and_passes_through() -> None:
    mig = Migration(COMPLETIONS, {"prompt": "p", "stream": True})
    raw = sglang_error(400, "BadRequestError") + sse.DONE
    assert mig.screen(raw) == (raw, raw, None)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (503, "Request running timeout reached."),
        (
            500,
            "Out of memory even after retracting all other requests in the decode batch. "
            "Aborting the last request.",
        ),
    ],
)
def test_aborts_the_request_causes_pass_through_and_are_not_migrated(
    code: int, message: str
) -> None:
    """scheduler.py `_abort_on_running_timeout` and schedule_batch.py `retract_decode`:
    the request's own length or size; another node would end it the same way."""
    mig = Migration(CHAT, chat_body())
    raw = (
        chat_chunk({"content": "a"}, use=usage(3, 1)) + sglang_error(code, "E", message) + sse.DONE
    )
    assert mig.screen(raw)[2] is None
    gen = Migration(GENERATE, {"input_ids": [1, 2, 3], "stream": True})
    finish = {"type": "abort", "message": message, "status_code": code, "err_type": None}
    raw = gen_event("ab", [7, 8]) + gen_event("abc", [7, 8, 9], finish=finish) + sse.DONE
    assert gen.screen(raw)[2] is None
    migrate_after = Migration(CHAT, chat_body())
    first_segment(migrate_after, chat_chunk({"content": "a"}, use=usage(3, 1)))
    migrate(migrate_after)
    out, abort = migrate_after.rewrite(
        chat_chunk({"content": "b"}, use=usage(5, 1), rid="c") + sglang_error(code, "E", message)
    )
    assert abort is None and events(out)[1]["error"]["message"] == message


def gen_event(
    text: str,
    ids: list[int],
    prompt: int = 3,
    finish: dict[str, Any] | None = None,
    **meta: Any,
) -> bytes:
    info = {
        "id": "gen-1",
        "finish_reason": finish,
        "prompt_tokens": prompt,
        "completion_tokens": len(ids),
        **meta,
    }
    return data({"text": text, "output_ids": ids, "meta_info": info})


def test_generate_engine_abort_migrates_but_a_client_abort_ends_the_stream() -> None:
    mig = Migration(GENERATE, {"input_ids": [1, 2, 3], "stream": True})
    running = gen_event("ab", [7, 8])
    engine = {"type": "abort", "message": "timeout", "status_code": 503, "err_type": None}
    kept, _, abort = mig.screen(running + gen_event("abc", [7, 8, 9], finish=engine) + sse.DONE)
    assert abort is not None and kept == running
    client_abort = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    raw = running + gen_event("abc", [7, 8, 9], finish=client_abort) + sse.DONE
    assert mig.screen(raw)[2] is None


def test_an_error_before_any_output_of_a_continuation_is_a_refusal() -> None:
    """SGLang's /generate stream refuses an invalid request in-band (http_server.py
    generate_request): HTTP 200, then `{"error": {..., "code": 400}}`, then [DONE]."""
    mig = Migration(GENERATE, {"input_ids": [1, 2, 3], "stream": True})
    first_segment(mig, gen_event("ab", [7, 8]))
    migrate(mig)
    error = {"message": "too long", "type": "invalid_request_error", "code": 400}
    with pytest.raises(ContinuationRefused, match="too long"):
        mig.rewrite(data({"error": {**error, "retryable": False}}) + sse.DONE)


def test_engine_abort_in_a_continuation_ends_that_segment() -> None:
    mig = Migration(CHAT, chat_body())
    first_segment(mig, chat_chunk({"content": "a"}, use=usage(3, 1)))
    migrate(mig)
    out, abort = mig.rewrite(
        chat_chunk({"content": "b"}, use=usage(5, 1), rid="c") + sglang_error(500, "INTERNAL")
    )
    assert abort is not None
    assert [e["choices"][0]["delta"]["content"] for e in events(out)] == ["b"]


# -- /generate: exact token ids, budgets, logprobs ------------------------------------


def test_generate_continues_from_exact_token_ids_with_the_budget_left() -> None:
    body = {"input_ids": [1, 2, 3], "stream": True, "sampling_params": {"max_new_tokens": 10}}
    mig = Migration(GENERATE, body)
    assert mig.first_body(b"raw") == b"raw"
    # Cumulative events; the reader lagged, so the second covers three tokens.
    first_segment(mig, gen_event("a", [7]) + gen_event("abcd", [7, 8, 9, 10]))
    cont = migrate(mig)
    assert cont["input_ids"] == [1, 2, 3, 7, 8, 9, 10]
    assert cont["sampling_params"]["max_new_tokens"] == 6
    out, _ = mig.rewrite(
        gen_event("e", [11], prompt=7)
        + gen_event(
            "efghij", [11, 12, 13, 14, 15, 16], prompt=7, finish={"type": "length", "length": 6}
        )
    )
    last = events(out)[-1]
    assert last["text"] == "abcdefghij"
    assert last["output_ids"] == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert last["meta_info"]["completion_tokens"] == 10
    assert last["meta_info"]["prompt_tokens"] == 3
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert last["meta_info"]["id"] == "gen-1"


def test_generate_budget_default_and_null() -> None:
    mig = Migration(GENERATE, {"text": "x", "stream": True})
    first_segment(mig, gen_event("ab", [7, 8]))
    assert migrate(mig)["sampling_params"]["max_new_tokens"] == 126, "SamplingParams' 128"
    mig = Migration(
        GENERATE, {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": None}}
    )
    first_segment(mig, gen_event("ab", [7, 8]))
    cont = migrate(mig)
    assert cont["sampling_params"]["max_new_tokens"] is None, "null: up to the context length"
    assert cont["text"] == "xab"


def test_generate_logprob_arrays_are_spliced() -> None:
    body = {
        "input_ids": [1, 2],
        "stream": True,
        "return_logprob": True,
        "top_logprobs_num": 1,
        "sampling_params": {"max_new_tokens": 4},
    }
    mig = Migration(GENERATE, body)
    first_meta: dict[str, Any] = {
        "input_token_logprobs": [[None, 1, None], [-0.5, 2, None]],
        "output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]],
        "output_top_logprobs": [[[-0.1, 7, None]], [[-0.2, 8, None]]],
        "output_token_logprobs_length": 2,
    }
    first_segment(mig, gen_event("ab", [7, 8], prompt=2, **first_meta))
    migrate(mig)
    second_meta: dict[str, Any] = {
        "input_token_logprobs": [
            [None, 1, None],
            [-0.5, 2, None],
            [-0.1, 7, None],
            [-0.2, 8, None],
        ],
        "output_token_logprobs": [[-0.3, 9, None], [-0.4, 10, None]],
        "output_top_logprobs": [[[-0.3, 9, None]], [[-0.4, 10, None]]],
        "output_token_logprobs_length": 2,
    }
    out, _ = mig.rewrite(gen_event("cd", [9, 10], prompt=4, **second_meta))
    meta = events(out)[0]["meta_info"]
    assert [t[1] for t in meta["output_token_logprobs"]] == [7, 8, 9, 10]
    assert [t[0][1] for t in meta["output_top_logprobs"]] == [7, 8, 9, 10]
    assert meta["output_token_logprobs_length"] == 4
    assert meta["input_token_logprobs"] == first_meta["input_token_logprobs"], (
        "the original prompt's"
    )
    assert meta["prompt_tokens"] == 2 and meta["completion_tokens"] == 4
