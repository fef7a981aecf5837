"""Contract tests: the simulator behaves as SGLang 0.5.19 does, point by point.

Each test's docstring names the SGLang source file (``python/sglang/...``) it mirrors;
docs/simulator.md lists them in its "Faithful to SGLang" table.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from prometheus_client.parser import text_string_to_metric_families

from ha_agent.config import SimSettings
from ha_agent.sim.__main__ import main as sim_main
from ha_agent.sim.faults import Faults
from ha_agent.sim.generator import StopRules
from ha_agent.sim.metrics import SimMetrics
from ha_agent.sim.scheduler import Engine, GenRequest, Job
from ha_agent.sim.tokenizer import get_tokenizer
from tests.unit.conftest import (
    SimClientFactory,
    make_sim_settings,
    sim_json_events,
    sim_live_state,
    sim_metric,
    sim_read_sse,
    sim_wait_for,
)

pytestmark = pytest.mark.timeout(30)

SCHED_LABELS = {
    "model_name": "sglang-ha-simulator",
    "engine_type": "unified",
    "tp_rank": "0",
    "pp_rank": "0",
    "moe_ep_rank": "0",
}


async def samples(client: Any, name: str) -> list[tuple[dict[str, str], float]]:
    text = await (await client.get("/metrics")).text()
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


async def next_event(resp: ClientResponse, timeout: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout)
    return json.loads(raw[6:])


def _gen(text: str, n: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "text": text,
        "stream": stream,
        "sampling_params": {"max_new_tokens": n, "ignore_eos": True, **extra},
    }


def _prompt_of(tokens: int, n: int, stream: bool = False, first: int = 7) -> dict[str, Any]:
    """A /generate body whose prompt is exactly ``tokens`` tokens (no prefix shared
    with another ``first``)."""
    return {
        "input_ids": [first] + [5] * (tokens - 1),
        "stream": stream,
        "sampling_params": {"max_new_tokens": n, "ignore_eos": True},
    }


# -- 1. request counters move at request finish -----------------------------------------
async def test_request_counters_grow_when_the_request_finishes(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/tokenizer_manager.py (collect_metrics, on finish) ->
    python/sglang/srt/observability/metrics_collector.py (observe_one_finished_request)."""
    client = await sim_client_factory(itl=0.005)
    resp = await client.post("/generate", json=_gen("finish", 60))
    for _ in range(20):
        await next_event(resp)
    for name in (
        "sglang:generation_tokens_total",
        "sglang:prompt_tokens_total",
        "sglang:num_requests_total",
    ):
        assert await sim_metric(client, name) == 0, name
    events = sim_json_events(await sim_read_sse(resp))
    meta = events[-1]["meta_info"]
    assert await sim_metric(client, "sglang:generation_tokens_total", is_streaming="true") == 60
    assert await sim_metric(client, "sglang:prompt_tokens_total") == meta["prompt_tokens"]
    assert await sim_metric(client, "sglang:num_requests_total", is_streaming="true") == 1
    # A non-stream request is labelled is_streaming="false".
    await client.post("/generate", json=_gen("again", 3, stream=False))
    assert await sim_metric(client, "sglang:num_requests_total", is_streaming="false") == 1


# -- 2. per-iteration progress and log-interval gauges ----------------------------------
async def test_realtime_tokens_count_every_prefill_and_decode_iteration(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/scheduler_components/metrics_reporter.py
    (report_prefill_stats / report_decode_stats -> increment_realtime_tokens) and
    python/sglang/srt/observability/metrics_collector.py (sglang:realtime_tokens_total)."""
    client = await sim_client_factory(itl=0.005, page_size=1)
    text = await (await client.get("/metrics")).text()
    assert "# TYPE sglang:realtime_tokens_total counter" in text
    assert "sglang:realtime_tokens_total{" not in text  # no series before the first token
    prompt = "a prompt long enough to be cached " * 4
    resp = await client.post("/generate", json=_gen(prompt, 30))
    await next_event(resp)

    async def decoding() -> bool:
        return await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") >= 5

    await sim_wait_for(decoding)  # grows while the request runs, unlike the counters above
    assert await sim_metric(client, "sglang:generation_tokens_total") == 0
    first = sim_json_events(await sim_read_sse(resp))[-1]["meta_info"]
    decode = [
        v
        for labels, v in await samples(client, "sglang:realtime_tokens_total")
        if labels == {**SCHED_LABELS, "mode": "decode"}
    ]
    assert decode == [30.0]
    computed = await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_compute")
    assert computed == first["prompt_tokens"]  # nothing cached the first time
    again = await (await client.post("/generate", json=_gen(prompt, 1, stream=False))).json()
    cached = again["meta_info"]["cached_tokens"]
    assert cached > 0
    assert await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_cache") == cached
    assert (
        await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_compute")
        == computed + again["meta_info"]["prompt_tokens"] - cached
    )


async def test_gauges_publish_at_log_points_not_continuously(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/scheduler_components/metrics_reporter.py: gauges are set
    by report_prefill_stats, every decode_log_interval decode iterations
    (report_decode_stats) and by the idle scheduler (_maybe_log_idle_metrics)."""
    client = await sim_client_factory(itl=0.02, decode_log_interval=40)
    long = await client.post("/generate", json=_gen("long", 300))
    await next_event(long)
    short = await client.post("/generate", json=_gen("short", 3))
    await next_event(short)
    assert await sim_metric(client, "sglang:num_running_reqs") == 2  # the prefill published
    await sim_read_sse(short)
    # The short one is gone, but no log point has passed: the gauge still says 2.
    assert (await sim_live_state(client))["num_running_reqs"] == 1
    assert await sim_metric(client, "sglang:num_running_reqs") == 2

    async def republished() -> bool:  # within 40 decode iterations (~0.8 s here)
        return await sim_metric(client, "sglang:num_running_reqs") == 1

    await sim_wait_for(republished, timeout=5)
    await client.post("/abort_request", json={"abort_all": True})
    await sim_read_sse(long)
    # Idle with a stale gauge: the scheduler's idle loop republishes at once.
    assert await sim_metric(client, "sglang:num_running_reqs") == 0


# -- 5. continuous usage and null budgets ------------------------------------------------
def _chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "count"}], "stream": stream, **extra}


def _data(payloads: list[str]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads if p != "[DONE]"]


async def test_chat_continuous_usage_on_every_content_chunk(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/openai/serving_chat.py (_generate_stream_content:
    usage on each content chunk when stream_options.continuous_usage_stats) and
    python/sglang/srt/entrypoints/openai/protocol.py (StreamOptions, UsageInfo)."""
    client = await sim_client_factory(itl=0.002)
    opts = {"include_usage": True, "continuous_usage_stats": True}
    resp = await client.post(
        "/v1/chat/completions",
        json=_chat(max_tokens=12, ignore_eos=True, stream_options=opts),
    )
    payloads = await sim_read_sse(resp)
    assert payloads[-1] == "[DONE]"
    chunks = _data(payloads)
    role, *content, finish, final = chunks
    assert "usage" not in role and "usage" not in finish
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 12
    assert content and all("usage" in c for c in content)
    counts = [c["usage"]["completion_tokens"] for c in content]
    assert counts == sorted(counts) and counts[-1] == 12  # cumulative, from the engine
    u = content[-1]["usage"]
    assert list(u) == [
        "prompt_tokens",
        "total_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "reasoning_tokens",
    ]
    assert u["total_tokens"] == u["prompt_tokens"] + 12


async def test_completions_continuous_usage_on_every_chunk(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/openai/serving_completions.py (chunk.usage when
    continuous_usage_stats; final usage chunk with exclude_none)."""
    client = await sim_client_factory(itl=0.002)
    resp = await client.post(
        "/v1/completions",
        json={
            "prompt": "count",
            "max_tokens": 8,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"continuous_usage_stats": True},
        },
    )
    chunks = _data(await sim_read_sse(resp))
    assert chunks and all(c["usage"] is not None for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    plain = await client.post(
        "/v1/completions",
        json={"prompt": "count", "max_tokens": 3, "ignore_eos": True, "stream": True},
    )
    assert all(c["usage"] is None for c in _data(await sim_read_sse(plain)))


async def test_null_budget_means_up_to_the_context(sim_client_factory: SimClientFactory) -> None:
    """python/sglang/srt/managers/scheduler.py (init_req_max_new_tokens: None -> 1 << 30,
    then clipped to max_req_len - input - 1, max_req_len from tp_worker.py) and
    python/sglang/srt/entrypoints/openai/protocol.py (chat max_tokens Optional,
    completions max_tokens: int = 16)."""
    client = await sim_client_factory(itl=0.0005, context_length=96, eos_rate=0.0)
    chat = await client.post("/v1/chat/completions", json=_chat(stream=False, max_tokens=None))
    body = await chat.json()
    prompt = body["usage"]["prompt_tokens"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == (96 - 1) - prompt - 1
    gen = await client.post(
        "/generate", json={"text": "abcd", "sampling_params": {"max_new_tokens": None}}
    )
    meta = (await gen.json())["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 95 - meta["prompt_tokens"] - 1}
    # An explicit budget that fills the context exactly is clipped the same way.
    full = await client.post(
        "/generate", json={"text": "abcd", "sampling_params": {"max_new_tokens": 96 - 2}}
    )
    assert (await full.json())["meta_info"]["completion_tokens"] == 95 - meta["prompt_tokens"] - 1
    bad = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": None})
    assert bad.status == 400


# -- 7. engine-side aborts ---------------------------------------------------------------
async def test_engine_abort_ends_a_generate_stream_with_its_status(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/schedule_batch.py (FINISH_ABORT.to_json),
    python/sglang/srt/managers/tokenizer_manager.py (_handle_abort_finish_reason: the
    stream yields the abort, non-stream raises HTTPException) and
    python/sglang/srt/entrypoints/http_server.py (generate_request, HTTPException handler)."""
    client = await sim_client_factory(faults={"abort_after_tokens": 5})
    resp = await client.post("/generate", json=_gen("x", 50))
    payloads = await sim_read_sse(resp)
    assert payloads[-1] == "[DONE]"
    last = sim_json_events(payloads)[-1]
    assert last["meta_info"]["finish_reason"] == {
        "type": "abort",
        "message": "Request running timeout reached.",
        "status_code": 503,
        "err_type": None,
    }
    assert len(last["output_ids"]) == 5
    plain = await client.post("/generate", json=_gen("y", 50, stream=False))
    assert plain.status == 503
    assert await plain.json() == {
        "object": "error",
        "message": "Request running timeout reached.",
        "type": "503",
        "param": None,
        "code": 503,
    }


async def test_engine_abort_in_openai_streams_is_an_error_chunk(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/openai/serving_chat.py and serving_completions.py
    (abort with a status_code -> create_streaming_error_response, break, usage, [DONE])."""
    client = await sim_client_factory(faults={"abort_after_tokens": 4, "abort_status": 500})
    resp = await client.post(
        "/v1/chat/completions",
        json=_chat(max_tokens=50, ignore_eos=True, stream_options={"include_usage": True}),
    )
    payloads = await sim_read_sse(resp)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-3])
    assert error == {
        "error": {
            "object": "error",
            "message": (
                "Out of memory even after retracting all other requests in the decode "
                "batch. Aborting the last request."
            ),
            "type": "INTERNAL_SERVER_ERROR",
            "param": None,
            "code": 500,
        }
    }
    usage = json.loads(payloads[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    chunks = _data(payloads[:-3])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # no finish chunk
    comp = await client.post(
        "/v1/completions",
        json={"prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True},
    )
    tail = await sim_read_sse(comp)
    assert tail[-1] == "[DONE]" and json.loads(tail[-2])["error"]["code"] == 500
    plain = await client.post("/v1/chat/completions", json=_chat(stream=False, max_tokens=50))
    assert plain.status == 500 and (await plain.json())["type"] == "500"


# -- 3. a lagging reader gets coalesced chunks -------------------------------------------
async def test_lagging_reader_gets_several_tokens_per_event() -> None:
    """python/sglang/srt/managers/tokenizer_manager.py (_stream_one_response: for a
    non-incremental stream only the latest queued output is sent, out = out_list[-1]).

    Checked on the engine's update feed, which every streaming handler reads: a reader
    that comes back after k tokens gets one update carrying all k.
    """
    settings = make_sim_settings(itl=0.001)
    tok = get_tokenizer()
    engine = Engine(settings, tok, SimMetrics(settings.model_name), Faults())
    prompt = "lag"
    req = GenRequest(
        prompt_text=prompt,
        prompt_ids=tok.encode(prompt),
        max_new_tokens=60,
        rules=StopRules(ignore_eos=True),
        stream=True,
    )
    job = engine.submit(req)
    seen: list[int] = []
    async for _ in job.updates():
        seen.append(len(job.output_ids))
        if len(seen) == 1:  # the reader lags while the engine keeps generating

            async def twenty(job: Job = job) -> bool:
                return len(job.output_ids) >= 20

            await sim_wait_for(twenty, interval=0.001)
    assert seen[-1] == 60 and seen == sorted(seen)
    assert seen[1] - seen[0] >= 19  # one update carried everything produced meanwhile
    assert len(seen) < 60


# -- 4. chat skips empty deltas; reasoning_content is always there -----------------------
async def test_chat_skips_empty_deltas_and_always_sends_reasoning_content(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/openai/serving_chat.py (_generate_stream_content:
    `if delta:`) and python/sglang/srt/entrypoints/openai/sse_utils.py (StreamDelta:
    reasoning_content required, role/content omitted when None)."""
    client = await sim_client_factory(itl=0.001, eos_rate=0.3)
    body = {"max_tokens": 200, "seed": 3}
    chat = _data(await sim_read_sse(await client.post("/v1/chat/completions", json=_chat(**body))))
    role, *content, finish = chat
    assert finish["choices"][0]["finish_reason"] == "stop"  # ended by EOS: no text
    assert finish["choices"][0]["delta"] == {"reasoning_content": None}
    assert role["choices"][0]["delta"] == {
        "reasoning_content": None,
        "role": "assistant",
        "content": "",
    }
    assert all(c["choices"][0]["delta"]["content"] for c in content)  # none empty
    assert all(c["choices"][0]["delta"]["reasoning_content"] is None for c in content)
    plain = await client.post("/v1/chat/completions", json=_chat(stream=False, **body))
    tokens = (await plain.json())["usage"]["completion_tokens"]
    assert len(content) == tokens - 1  # the EOS update had an empty delta: skipped
    # /v1/completions sends every update, the empty one included.
    comp = await client.post(
        "/v1/completions",
        json={"prompt": "<|user|>\ncount<|end|>\n<|assistant|>\n", "stream": True, **body},
    )
    chunks = _data(await sim_read_sse(comp))
    assert chunks[-1]["choices"][0]["text"] == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# -- 6. health checks: not queued behind a busy scheduler --------------------------------
async def test_health_check_while_busy_is_answered_after_the_next_batch_not_queued(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/http_server.py (health_generate: a 1-token request
    rid HEALTH_CHECK_*, 200 once any output reached the tokenizer after it began, looked
    at every second) and python/sglang/srt/managers/scheduler.py (process_input_requests:
    a health check reaching a busy scheduler is not queued; maybe_send_health_check_signal
    answers it after the next batch result)."""
    client = await sim_client_factory(
        itl=0.005, max_running_requests=1, health_check_interval=0.05, health_check_timeout=0.5
    )
    busy = await client.post("/generate", json=_gen("busy", 200))
    await next_event(busy)
    assert (await asyncio.wait_for(client.get("/health"), 5)).status == 200
    live = await sim_live_state(client)
    assert live["num_queue_reqs"] == 0  # never queued behind the running request
    await sim_read_sse(busy)
    assert await sim_metric(client, "sglang:num_requests_total") == 1  # health not counted


async def test_health_check_when_idle_runs_as_a_generation(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/http_server.py (health_generate) and
    python/sglang/srt/managers/scheduler.py (is_fully_idle: an idle scheduler runs the
    check's 1-token request; its output goes through the detokenizer); a hung scheduler
    gives no output and the check is 503 after SGLANG_HEALTH_CHECK_TIMEOUT."""
    client = await sim_client_factory(health_check_interval=0.05, health_check_timeout=0.4)
    assert (await client.get("/health")).status == 200
    assert await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") == 1
    await client.post("/sim/faults", json={"hang": True})
    assert (await client.get("/health")).status == 503


async def test_health_behind_a_long_forward_waits_for_its_end(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/scheduler.py (maybe_send_health_check_signal after
    process_batch_result; "prevent the health check signal being blocked by long context
    prefill" only as far as the forward in flight ends): a check during one forward
    longer than SGLANG_HEALTH_CHECK_TIMEOUT is 503 (sglang#22511); shorter, 200 at its
    end."""
    client = await sim_client_factory(
        prefill_per_token=0.001,
        chunked_prefill_size=-1,
        health_check_interval=0.05,
        health_check_timeout=0.4,
    )
    long_prefill = asyncio.create_task(client.post("/generate", json=_prompt_of(1000, 1)))

    async def prefilling() -> bool:
        return (await sim_live_state(client))["num_running_reqs"] == 1

    await sim_wait_for(prefilling)
    assert (await client.get("/health")).status == 503  # the forward takes 1 s
    assert (await asyncio.wait_for(long_prefill, 10)).status == 200
    short = await sim_client_factory(
        prefill_per_token=0.0002,
        chunked_prefill_size=-1,
        health_check_interval=0.05,
        health_check_timeout=0.6,
    )
    shorter = asyncio.create_task(short.post("/generate", json=_prompt_of(1000, 1)))

    async def short_prefilling() -> bool:
        return (await sim_live_state(short))["num_running_reqs"] == 1

    await sim_wait_for(short_prefilling)
    assert (await short.get("/health")).status == 200  # answered when the ~0.2 s forward ends
    assert (await asyncio.wait_for(shorter, 10)).status == 200


async def test_new_requests_wait_for_kv_room(sim_client_factory: SimClientFactory) -> None:
    """python/sglang/srt/managers/schedule_policy.py (PrefillAdder.add_one_req: prompt +
    min(max_new_tokens, CLIP) + page must fit in the pool less the running requests'
    tokens and new_token_ratio x their remaining budgets -> NO_TOKEN, the request waits)."""
    client = await sim_client_factory(itl=0.002, max_total_tokens=256, page_size=16)
    first = await client.post("/generate", json=_gen("a", 150))
    await next_event(first)
    second = asyncio.create_task(client.post("/generate", json=_gen("b", 150, stream=False)))

    async def waits_for_kv() -> bool:  # a running slot is free, the KV pool is not
        live = await sim_live_state(client)
        return live["num_queue_reqs"] == 1 and live["num_running_reqs"] == 1

    await sim_wait_for(waits_for_kv)
    await sim_read_sse(first)
    out = await (await asyncio.wait_for(second, 10)).json()
    assert out["meta_info"]["completion_tokens"] == 150
    assert out["meta_info"]["queue_time"] > 0.1
    # Small requests fit next to a big one.
    big = await client.post("/generate", json=_gen("c", 100))
    await next_event(big)
    small = await client.post("/generate", json=_gen("d", 5, stream=False))
    assert (await small.json())["meta_info"]["queue_time"] < 0.05
    await sim_read_sse(big)


# -- 8. --api-key and --admin-api-key ----------------------------------------------------
async def test_api_key_guards_everything_but_health_and_metrics(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/utils/auth.py (decide_request_auth: /health* and /metrics
    exempt by prefix, Bearer scheme case-insensitive, 401 {"error": "Unauthorized"})."""
    client = await sim_client_factory(api_key="s3cret")
    ok = {"Authorization": "Bearer s3cret"}
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    refused = await client.post("/generate", json=body)
    assert refused.status == 401 and await refused.json() == {"error": "Unauthorized"}
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        assert (await client.post("/generate", json=body, headers=headers)).status == 401
    assert (await client.post("/generate", json=body, headers=ok)).status == 200
    lower = {"Authorization": "bearer s3cret"}
    assert (await client.post("/generate", json=body, headers=lower)).status == 200
    for path in ("/v1/models", "/model_info", "/server_info", "/no/such/path"):
        assert (await client.get(path)).status == 401, path
    for path in ("/health", "/health_generate", "/metrics"):
        assert (await client.get(path)).status == 200, path
    # Admin-optional routes take the api key when no admin key is set.
    assert (await client.post("/abort_request", json={"rid": "x"})).status == 401
    assert (await client.post("/abort_request", json={"rid": "x"}, headers=ok)).status == 200


async def test_admin_api_key_alone_unlocks_control_routes(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/utils/auth.py (ADMIN_OPTIONAL: with both keys only the admin key;
    NORMAL: only the api key) and python/sglang/srt/entrypoints/http_server.py
    (/abort_request, /pause_generation, /continue_generation, /flush_cache are
    @auth_level(AuthLevel.ADMIN_OPTIONAL))."""
    client = await sim_client_factory(api_key="user", admin_api_key="admin")
    user = {"Authorization": "Bearer user"}
    admin = {"Authorization": "Bearer admin"}
    for path in ("/pause_generation", "/continue_generation", "/flush_cache"):
        assert (await client.post(path, json={}, headers=user)).status == 401, path
        assert (await client.post(path, json={}, headers=admin)).status == 200, path
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    assert (await client.post("/generate", json=body, headers=admin)).status == 401
    assert (await client.post("/generate", json=body, headers=user)).status == 200
    only_admin = await sim_client_factory(admin_api_key="admin")
    assert (await only_admin.post("/generate", json=body)).status == 200
    assert (await only_admin.post("/abort_request", json={"rid": "x"})).status == 401


def test_api_keys_come_from_env_or_files_not_only_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sim_env_clean: None
) -> None:
    """Our addition, not SGLang's: SIM_API_KEY(_FILE), SIM_ADMIN_API_KEY(_FILE); the
    --api-key / --admin-api-key flags of python/sglang/srt/server_args.py also work."""
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("SIM_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("SIM_ADMIN_API_KEY", "from-env")
    settings = SimSettings()
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "from-file"
    assert settings.admin_api_key is not None
    assert settings.admin_api_key.get_secret_value() == "from-env"
    assert "from-file" not in settings.model_dump_json()  # secrets stay masked
    with pytest.raises(ValueError, match="not both"):
        SimSettings(api_key="x")
    monkeypatch.setenv("SIM_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read"):
        SimSettings()
    monkeypatch.delenv("SIM_API_KEY_FILE")
    assert sim_main(["--api-key", "k", "--admin-api-key", "a", "--validate-config"]) == 0


# -- 9. what the simulator cannot do is a clear 400 ---------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True},
        ),
        ("/v1/completions", {"prompt": "x", "logprobs": 2}),
        ("/generate", {"text": "x", "return_logprob": True}),
        ("/generate", {"text": "x", "sampling_params": {"n": 3}}),
    ],
)
async def test_unsupported_features_are_refused_not_ignored(
    sim_client_factory: SimClientFactory, path: str, body: dict[str, Any]
) -> None:
    """Not SGLang's behaviour (SGLang serves these): the simulator says it cannot, with a
    400 naming itself, rather than answering something SGLang would not
    (python/sglang/srt/entrypoints/openai/protocol.py, srt/managers/io_struct.py)."""
    client = await sim_client_factory()
    resp = await client.post(path, json=body)
    assert resp.status == 400
    assert "not supported by the simulator" in await resp.text()


async def test_generate_stream_refuses_in_band_with_http_200(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/http_server.py (generate_request, stream: the
    tokenizer manager's ValueError becomes `data: {"error": {..., "code": 400,
    "retryable": false}}` after the 200 headers, then [DONE]); without stream, a 400."""
    client = await sim_client_factory(context_length=64)
    too_long = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 100}}
    resp = await client.post("/generate", json=too_long)
    payloads = await sim_read_sse(resp)
    assert payloads[-1] == "[DONE]" and len(payloads) == 2
    error = json.loads(payloads[0])["error"]
    assert error["code"] == 400 and error["retryable"] is False
    assert error["type"] == "invalid_request_error" and "context length" in error["message"]
    plain = await client.post("/generate", json={**too_long, "stream": False})
    assert plain.status == 400
    rid = {"text": "y", "stream": True, "rid": "dup", "sampling_params": {"max_new_tokens": 40}}
    first = await client.post("/generate", json=rid)
    second = await sim_read_sse(await client.post("/generate", json=rid))
    assert json.loads(second[0])["error"]["code"] == 400
    await sim_read_sse(first)


async def test_token_ids_come_back_where_sglang_returns_them(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/openai/serving_completions.py (return_token_ids:
    each chunk the output ids new since the last, the first chunk the prompt's;
    CompletionResponseStreamChoice drops them when None) and
    python/sglang/srt/managers/tokenizer_manager.py (return_prompt_token_ids: every
    /generate output carries `prompt_token_ids`)."""
    client = await sim_client_factory()
    tok = get_tokenizer()
    body = {"prompt": "Count to ten", "max_tokens": 12, "ignore_eos": True, "stream": True}
    chunks = _data(
        await sim_read_sse(
            await client.post("/v1/completions", json={**body, "return_token_ids": True})
        )
    )
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[0]["prompt_token_ids"] == tok.encode("Count to ten")
    assert all("prompt_token_ids" not in c for c in choices[1:])
    ids = [t for c in choices for t in c["token_ids"]]
    assert len(ids) == 12 and tok.decode(ids) == "".join(c["text"] for c in choices)
    plain = _data(await sim_read_sse(await client.post("/v1/completions", json=body)))
    assert all("token_ids" not in c["choices"][0] for c in plain if c["choices"])
    gen = await client.post(
        "/generate",
        json={
            "text": "Count to ten",
            "return_prompt_token_ids": True,
            "stream": True,
            "sampling_params": {"max_new_tokens": 4},
        },
    )
    events = _data(await sim_read_sse(gen))
    assert all(e["prompt_token_ids"] == tok.encode("Count to ten") for e in events)


async def test_generate_with_text_and_input_ids_takes_the_ids_as_the_prompt(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/tokenizer_manager.py (_tokenize_one_request: with
    obj.input_ids given, they are the prompt and text is not tokenized) and
    python/sglang/srt/managers/io_struct.py (GenerateReqInput._validate_inputs refuses
    only none of text, input_ids, input_embeds, or all three)."""
    client = await sim_client_factory()
    tok = get_tokenizer()
    params = {"max_new_tokens": 8, "ignore_eos": True}
    ids = tok.encode("The ids say this")

    async def answer(body: dict[str, Any]) -> dict[str, Any]:
        resp = await client.post(
            "/generate", json={**body, "sampling_params": params, "return_prompt_token_ids": True}
        )
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result

    both = await answer({"text": "while the text says that", "input_ids": ids})
    only_ids = await answer({"input_ids": ids})
    assert both["prompt_token_ids"] == ids
    assert both["meta_info"]["prompt_tokens"] == len(ids)
    assert both["output_ids"] == only_ids["output_ids"]


async def test_chat_token_ids_and_meta_info_come_back_without_stream_only(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/entrypoints/openai/serving_chat.py (_convert_to_internal_request
    refuses return_prompt_token_ids, return_token_ids and return_meta_info with stream;
    _build_chat_response puts prompt_token_ids, response_token_ids and meta_info on the
    choice) and protocol.py (ChatCompletionResponseChoice drops each when None)."""
    client = await sim_client_factory()
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Count to ten"}],
        "max_tokens": 6,
        "ignore_eos": True,
    }
    for flag in ("return_prompt_token_ids", "return_token_ids", "return_meta_info"):
        resp = await client.post("/v1/chat/completions", json={**body, flag: True, "stream": True})
        assert resp.status == 400, flag
        error = await resp.json()
        # Raised in _convert_to_internal_request: handle_request's own type.
        assert error["type"] == "BadRequest"
        assert f"{flag} is not supported with streaming" in error["message"]
    resp = await client.post(
        "/v1/chat/completions", json={**body, "return_token_ids": True, "return_meta_info": True}
    )
    assert resp.status == 200, await resp.text()
    choice = (await resp.json())["choices"][0]
    tok = get_tokenizer()
    assert len(choice["response_token_ids"]) == 6
    assert tok.decode(choice["response_token_ids"]) == choice["message"]["content"]
    assert tok.decode(choice["prompt_token_ids"]).endswith("<|assistant|>\n")
    assert choice["meta_info"]["completion_tokens"] == 6
    plain = (await (await client.post("/v1/chat/completions", json=body)).json())["choices"][0]
    assert not {"prompt_token_ids", "response_token_ids", "meta_info"} & set(plain)


# -- 9. one forward at a time: prefill blocks decode, counters move at batch end ---------
async def _gaps_while(resp: ClientResponse, task: asyncio.Task[Any]) -> float:
    """The longest silence between a stream's events while ``task`` runs."""
    loop = asyncio.get_running_loop()
    last, longest = loop.time(), 0.0
    while not task.done():
        try:
            await next_event(resp, timeout=5.0)
        except asyncio.TimeoutError:
            break
        now = loop.time()
        longest, last = max(longest, now - last), now
    return longest


async def test_prefill_forward_blocks_the_decode_step_for_its_whole_length(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/scheduler.py (get_next_batch_to_run: "Run prefill first
    if possible"; one batch per loop iteration, so a running stream gets no token while
    a prefill forward runs) and python/sglang/srt/managers/scheduler_components/
    metrics_reporter.py (report_prefill_stats, called from process_batch_result_prefill:
    the prefill counters move when the forward ends, not during it)."""
    client = await sim_client_factory(itl=0.005, prefill_per_token=0.0005, chunked_prefill_size=-1)
    stream = await client.post("/generate", json=_gen("decoding", 2000))
    await next_event(stream)
    before = await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_compute")
    long = asyncio.create_task(client.post("/generate", json=_prompt_of(2000, 1)))

    async def forward_started() -> bool:
        return (await sim_live_state(client))["num_running_reqs"] == 2

    await sim_wait_for(forward_started)
    during = await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_compute")
    gap = await _gaps_while(stream, long)
    out = await (await long).json()
    assert during == before  # nothing counted mid-forward
    assert gap > 0.8  # the 2000-token forward takes 1 s and the stream got nothing
    after = await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_compute")
    assert after == before + 2000
    assert out["meta_info"]["e2e_latency"] >= 1.0
    await client.post("/abort_request", json={"abort_all": True})


async def test_forward_time_grows_with_prefill_tokens_and_chunks_split_it(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/schedule_policy.py (PrefillAdder: a prompt longer than
    the chunk left is cut, rem_chunk_tokens) and python/sglang/srt/server_args.py
    (--chunked-prefill-size, -1 disables chunking): with chunks, the prefill counters
    rise chunk by chunk; without, in one step; a forward's time grows with its tokens."""
    client = await sim_client_factory(prefill_per_token=0.001, chunked_prefill_size=500)
    short = await (await client.post("/generate", json=_prompt_of(200, 1, first=8))).json()
    long = asyncio.create_task(client.post("/generate", json=_prompt_of(2000, 1)))
    seen: set[float] = set()
    while not long.done():
        seen.add(await sim_metric(client, "sglang:realtime_tokens_total", mode="prefill_compute"))
        await asyncio.sleep(0.02)
    out = await (await long).json()
    assert out["meta_info"]["e2e_latency"] > 5 * short["meta_info"]["e2e_latency"]
    assert {v - 200 for v in seen} <= {0, 500, 1000, 1500, 2000}
    assert len({500, 1000, 1500} & {v - 200 for v in seen}) >= 2  # chunk by chunk


async def test_queue_full_is_a_503(sim_client_factory: SimClientFactory) -> None:
    """python/sglang/srt/managers/scheduler.py (_abort_on_queued_limit: with
    --max-queued-requests, a request that would wait behind that many is aborted with
    status 503, "The request queue is full.")."""
    client = await sim_client_factory(itl=0.01, max_running_requests=1, max_queued_requests=1)
    running = await client.post("/generate", json=_gen("one", 500))
    await next_event(running)
    queued = asyncio.create_task(client.post("/generate", json=_gen("two", 1, stream=False)))

    async def one_waits() -> bool:
        return (await sim_live_state(client))["num_queue_reqs"] == 1

    await sim_wait_for(one_waits)
    refused = await client.post("/generate", json=_gen("three", 1, stream=False))
    assert refused.status == 503
    assert "The request queue is full." in await refused.text()
    await client.post("/abort_request", json={"abort_all": True})
    await queued


# -- 10. the detokenizer stage ------------------------------------------------------------
async def test_detokenizer_stall_stops_client_output_not_the_scheduler(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/detokenizer_manager.py (every batch output passes it on
    its way to the tokenizer manager), python/sglang/srt/managers/tokenizer_manager.py
    (collect_metrics: time to first token and inter-token latency observed per output
    received; last_receive_tstamp) and python/sglang/srt/observability/
    metrics_collector.py (observe_inter_token_latency): with the detokenizer stalled the
    scheduler's realtime_tokens_total keeps rising, the tokenizer-side histograms and the
    stream do not; /health answers 200 only while the scheduler is busy
    (Scheduler.maybe_send_health_check_signal skips the detokenizer)."""
    client = await sim_client_factory(
        itl=0.005, health_check_interval=0.05, health_check_timeout=0.4
    )
    stream = await client.post("/generate", json=_gen("stalled", 3000))
    await next_event(stream)
    await next_event(stream)
    await client.post("/sim/faults", json={"detok_stall": True})
    await asyncio.sleep(0.05)  # an event already on its way may still arrive
    itl = await sim_metric(client, "sglang:inter_token_latency_seconds_count")
    decode = await sim_metric(client, "sglang:realtime_tokens_total", mode="decode")

    async def scheduler_runs_on() -> bool:
        now = await sim_metric(client, "sglang:realtime_tokens_total", mode="decode")
        return now > decode + 20

    await sim_wait_for(scheduler_runs_on)
    with pytest.raises(asyncio.TimeoutError):
        await next_event(stream, timeout=0.3)
    assert await sim_metric(client, "sglang:inter_token_latency_seconds_count") == itl
    assert (await client.get("/health")).status == 200  # busy: the signal skips it
    await client.post("/sim/faults", json={"detok_stall": False})
    event = await next_event(stream, timeout=2.0)
    assert len(event["output_ids"]) > 20  # everything held back, at once
    assert await sim_metric(client, "sglang:inter_token_latency_seconds_count") > itl + 20
    await client.post("/abort_request", json={"abort_all": True})
    await sim_read_sse(stream)
    idle = await sim_client_factory(health_check_interval=0.05, health_check_timeout=0.4)
    await idle.post("/sim/faults", json={"detok_stall": True})
    assert (await idle.get("/health")).status == 503  # idle: its own output is held


async def test_non_streaming_output_reaches_the_tokenizer_every_50_tokens(
    sim_client_factory: SimClientFactory,
) -> None:
    """python/sglang/srt/managers/scheduler_components/output_streamer.py
    (OutputStreamer.accept: a non-streaming request is sent on every
    SGLANG_FORCE_STREAM_INTERVAL = 50 tokens, srt/environ.py, and when it finishes) and
    python/sglang/srt/managers/tokenizer_manager.py (collect_metrics: the first output
    received is the time to first token, later ones add their new tokens to the
    inter-token histogram)."""
    client = await sim_client_factory(itl=0.01)
    task = asyncio.create_task(client.post("/generate", json=_gen("quiet", 120, stream=False)))

    async def count(name: str) -> float:  # 0 before the histogram's first observation
        return sum(v for _, v in await samples(client, name))

    seen: set[tuple[float, float]] = set()
    while not task.done():
        seen.add(
            (
                await count("sglang:time_to_first_token_seconds_count"),
                await count("sglang:inter_token_latency_seconds_count"),
            )
        )
        await asyncio.sleep(0.02)
    assert (await task).status == 200
    assert seen <= {(0, 0), (1, 0), (1, 50), (1, 70)}, seen
    assert (1, 0) in seen  # the first output came at 50 tokens, not at the first
    assert await sim_metric(client, "sglang:inter_token_latency_seconds_count") == 70


async def test_server_info_reports_the_running_slots_per_data_parallel_rank(
    sim_client_factory: SimClientFactory,
) -> None:
    """`srt/managers/scheduler.py` (`get_internal_state`): each entry of
    `/server_info`'s `internal_states` (one per DP rank) carries the scheduler's
    `effective_max_running_requests_per_dp`; the top-level `max_running_requests` is
    the flag as given (`srt/entrypoints/http_server.py` `server_info`)."""
    client = await sim_client_factory(max_running_requests=6)
    info = await (await client.get("/server_info")).json()
    assert [s["effective_max_running_requests_per_dp"] for s in info["internal_states"]] == [6]
    assert info["max_running_requests"] == 6
