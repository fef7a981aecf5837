"""The simulator's HTTP surface: SGLang's endpoints, formats, control and errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from ha_agent.sim.tokenizer import EOS_ID, get_tokenizer
from tests.unit.conftest import (
    SimClientFactory,
    sim_json_events,
    sim_live_state,
    sim_metric,
    sim_read_sse,
    sim_wait_for,
)

LONG = {"max_new_tokens": 2000, "ignore_eos": True}  # runs until aborted or cleaned up

pytestmark = pytest.mark.timeout(30)


async def next_event(resp: ClientResponse, timeout: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    return json.loads(raw[6:])


def fixed(n: int) -> dict[str, Any]:
    """Sampling params for exactly ``n`` tokens (EOS ignored)."""
    return {"max_new_tokens": n, "ignore_eos": True}


async def start_stream(
    client: TestClient, text: str, sampling: dict[str, Any] = LONG, **extra: Any
) -> ClientResponse:
    """POST a streaming /generate and read its first event: the request is running."""
    body = {"text": text, "stream": True, "sampling_params": sampling, **extra}
    resp = await client.post("/generate", json=body)
    await next_event(resp)
    return resp


# -- health, readiness, info --------------------------------------------------------
async def test_health_is_503_while_starting_then_200(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(startup_delay=0.3)
    for path in ("/health", "/health_generate"):
        assert (await client.get(path)).status == 503
    assert (await client.get("/model_info")).status == 200  # answers while loading

    async def healthy() -> bool:
        return (await client.get("/health")).status == 200

    await sim_wait_for(healthy, timeout=5)
    assert (await client.get("/health_generate")).status == 200


async def test_generation_during_startup_waits_for_it(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(startup_delay=0.2)
    t0 = time.monotonic()
    resp = await client.post(
        "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}
    )
    assert resp.status == 200 and time.monotonic() - t0 >= 0.15


async def test_info_endpoints_say_simulator(sim_client: TestClient):
    for path in ("/model_info", "/get_model_info"):
        info = await (await sim_client.get(path)).json()
        assert info["model_path"] == "sglang-ha-simulator" and info["is_generation"] is True
        assert info["simulator"] is True and info["weight_version"] == "default"
    for path in ("/server_info", "/get_server_info"):
        info = await (await sim_client.get(path)).json()
        assert info["simulator"] is True and "simulator" in info["version"]
        assert info["served_model_name"] == "sglang-ha-simulator"
        assert info["internal_states"][0]["num_running_reqs"] == 0
    models = await (await sim_client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["sglang-ha-simulator"]
    assert models["data"][0]["max_model_len"] == 32768
    assert (await sim_client.get("/v1/models/sglang-ha-simulator")).status == 200
    missing = await sim_client.get("/v1/models/other")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "model_not_found"


async def test_model_name_setting(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(model_name="sim-b", instance_name="node-b")
    info = await (await client.get("/server_info")).json()
    assert info["served_model_name"] == "sim-b" and info["instance_name"] == "node-b"
    assert 'model_name="sim-b"' in await (await client.get("/metrics")).text()


# -- /generate ----------------------------------------------------------------------
async def test_generate_non_stream_format(sim_client: TestClient):
    out = await (
        await sim_client.post(
            "/generate",
            json={
                "text": "Hello",
                "rid": "req-1",
                "sampling_params": {"max_new_tokens": 8, "ignore_eos": True},
            },
        )
    ).json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["id"] == "req-1"
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert meta["prompt_tokens"] > 0 and meta["cached_tokens"] == 0
    assert meta["weight_version"] == "default" and meta["e2e_latency"] > 0
    assert out["text"].startswith(" ")


async def test_generate_stream_is_cumulative_sse(sim_client: TestClient):
    body = {"text": "Stream me", "stream": True, "sampling_params": {"max_new_tokens": 12}}
    events = sim_json_events(await sim_read_sse(await sim_client.post("/generate", json=body)))
    for prev, cur in itertools.pairwise(events):
        assert cur["text"].startswith(prev["text"])  # cumulative text
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
        assert prev["meta_info"]["finish_reason"] is None
        assert "e2e_latency" not in prev["meta_info"]
    last = events[-1]
    assert last["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    assert last["meta_info"]["completion_tokens"] == len(last["output_ids"])
    assert "e2e_latency" in last["meta_info"]
    # The same request without streaming gives the same result.
    body["stream"] = False
    plain = await (await sim_client.post("/generate", json=body)).json()
    assert plain["text"] == last["text"] and plain["output_ids"] == last["output_ids"]


async def test_generate_stop_strings_and_eos_finish_reasons(sim_client_factory):
    client = await sim_client_factory(eos_rate=0.2)
    body = {"text": "abc", "sampling_params": {"max_new_tokens": 50, "sampling_seed": 1}}
    for seed in range(50):
        body["sampling_params"]["sampling_seed"] = seed
        out = await (await client.post("/generate", json=body)).json()
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            break
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS_ID}
    assert out["output_ids"][-1] == EOS_ID
    free = await (
        await client.post(
            "/generate",
            json={"text": "abc", "sampling_params": {"max_new_tokens": 10, "ignore_eos": True}},
        )
    ).json()
    stop = free["text"].split(" ")[3]
    cut = await (
        await client.post(
            "/generate",
            json={
                "text": "abc",
                "sampling_params": {"max_new_tokens": 10, "ignore_eos": True, "stop": [stop]},
            },
        )
    ).json()
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert cut["text"] == free["text"][: free["text"].index(stop)]


async def test_determinism_across_instances(sim_client_factory: SimClientFactory):
    a, b = await sim_client_factory(), await sim_client_factory()
    body = {
        "text": "Same everywhere",
        "sampling_params": {"max_new_tokens": 30, "temperature": 0.9, "sampling_seed": 3},
    }
    out_a = await (await a.post("/generate", json=body)).json()
    out_b = await (await b.post("/generate", json=body)).json()
    assert out_a["output_ids"] == out_b["output_ids"] and out_a["text"] == out_b["text"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    ca = await (await a.post("/v1/chat/completions", json=chat)).json()
    cb = await (await b.post("/v1/chat/completions", json=chat)).json()
    assert ca["choices"][0]["message"] == cb["choices"][0]["message"]
    body["sampling_params"]["sampling_seed"] = 4
    other = await (await a.post("/generate", json=body)).json()
    assert other["output_ids"] != out_a["output_ids"]


# -- OpenAI SSE framing ---------------------------------------------------------------
async def test_completions_stream_format(sim_client: TestClient):
    body = {
        "prompt": "Once",
        "max_tokens": 10,
        "seed": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sim_json_events(
        await sim_read_sse(await sim_client.post("/v1/completions", json=body))
    )
    *chunks, usage_chunk = events
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len({c["id"] for c in events}) == 1
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == (
        usage_chunk["usage"]["prompt_tokens"] + usage_chunk["usage"]["completion_tokens"]
    )
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    plain = await (await sim_client.post("/v1/completions", json={**body, "stream": False})).json()
    assert streamed == plain["choices"][0]["text"]
    assert plain["object"] == "text_completion" and plain["metadata"] == {
        "weight_version": "default"
    }
    no_usage = sim_json_events(
        await sim_read_sse(
            await sim_client.post("/v1/completions", json={**body, "stream_options": None})
        )
    )
    assert all(e["choices"] for e in no_usage)


async def test_chat_stream_format(sim_client: TestClient):
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "stream": True,
        "seed": 2,
        "stream_options": {"include_usage": True},
        "model": "whatever",
    }
    events = sim_json_events(
        await sim_read_sse(await sim_client.post("/v1/chat/completions", json=body))
    )
    first, *content, finish, usage_chunk = events
    assert first["object"] == "chat.completion.chunk" and first["model"] == "whatever"
    assert first["choices"][0]["delta"] == {
        "reasoning_content": None,
        "role": "assistant",
        "content": "",
    }
    assert all(set(c["choices"][0]["delta"]) == {"reasoning_content", "content"} for c in content)
    assert finish["choices"][0]["delta"] == {"reasoning_content": None}
    assert finish["choices"][0]["finish_reason"] in ("length", "stop")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in content)
    plain = await (
        await sim_client.post("/v1/chat/completions", json={**body, "stream": False})
    ).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["role"] == "assistant"
    assert plain["choices"][0]["message"]["content"] == streamed


# -- errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/generate", {"text": "x", "sampling_params": {"temperature": -0.5}}, "temperature"),
        ("/generate", {"text": "x", "sampling_params": {"temperature": "hot"}}, "temperature"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ("/generate", {"text": "x", "sampling_params": {"top_p": 0}}, "top_p"),
        ("/generate", {"text": "x", "sampling_params": {"top_k": 0}}, "top_k"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokns": 3}}, "max_new_tokns"),
        ("/generate", {"sampling_params": {}}, "should be provided"),
        ("/generate", {"input_ids": [1, 99999999]}, "out of vocabulary"),
        ("/generate", {"text": ["a", "b"]}, "batch"),
        ("/generate", {"text": "x", "sampling_params": {"ebnf": "a"}}, "ebnf"),
        ("/generate", {"text": "x", "sampling_params": {"regex": "(?<=a)b"}}, "lookahead"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 40000}}, "context"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -3}, "max_tokens must be positive"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n > 1"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": ""}, "Prompt cannot be empty"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "Messages cannot be empty"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
            "max_new_tokens",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "not supported",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            "schema",
        ),
    ],
)
async def test_bad_requests_get_400_with_a_reason(sim_client: TestClient, path, body, needle):
    resp = await sim_client.post(path, json=body)
    assert resp.status == 400
    err = await resp.json()
    message = err["error"]["message"] if "error" in err else err["message"]
    if "object" in err:
        assert err["object"] == "error" and err["code"] == 400
    assert needle in message


async def test_malformed_json_wrong_content_type_and_unknown_paths(sim_client: TestClient):
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        resp = await sim_client.post(
            path, data=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert resp.status == 400
        assert (await resp.json())["type"] == "Bad Request"
    resp = await sim_client.post(
        "/v1/completions", data=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}
    )
    assert resp.status == 400 and "application/json" in (await resp.json())["message"]
    resp = await sim_client.get("/no/such/path")
    assert resp.status == 404 and await resp.json() == {"detail": "Not Found"}
    assert (await sim_client.get("/generate")).status == 405


async def test_duplicate_rid_is_refused(sim_client: TestClient):
    first = await start_stream(sim_client, "x", rid="dup")
    second = await sim_client.post("/generate", json={"text": "y", "rid": "dup"})
    assert second.status == 400 and "Duplicate" in (await second.json())["error"]["message"]
    await sim_client.post("/abort_request", json={"rid": "dup"})
    first.close()


# -- control: abort, pause, flush -----------------------------------------------------
async def test_abort_request_ends_a_running_stream(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005)
    resp = await start_stream(client, "x", rid="to-abort")
    assert (await client.post("/abort_request", json={"rid": "to-abort"})).status == 200
    events = sim_json_events(await sim_read_sse(resp))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(events[-1]["output_ids"]) < 2000
    assert await sim_metric(client, "sglang:num_aborted_requests_total") == 1
    assert await sim_metric(client, "sglang:num_running_reqs") == 0
    # Unknown rid: accepted, nothing happens (as SGLang).
    assert (await client.post("/abort_request", json={"rid": "nope"})).status == 200


async def test_abort_all_ends_non_stream_requests(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005)
    tasks = [
        asyncio.create_task(
            client.post("/generate", json={"text": f"x{i}", "sampling_params": LONG})
        )
        for i in range(3)
    ]

    async def three_running() -> bool:
        return await sim_metric(client, "sglang:num_running_reqs") == 3

    await sim_wait_for(three_running)
    await client.post("/abort_request", json={"abort_all": True})
    for resp in await asyncio.wait_for(asyncio.gather(*tasks), 5):
        out = await resp.json()
        assert resp.status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort"


async def test_pause_in_place_holds_tokens(sim_client_factory):
    client = await sim_client_factory(itl=0.005, health_check_timeout=0.2)
    resp = await start_stream(client, "x", fixed(30))
    paused = await client.post("/pause_generation", json={"mode": "in_place"})
    assert await paused.json() == {"message": "Generation paused successfully.", "status": "ok"}
    # Nothing comes out of a paused engine, the health check's own token neither.
    assert (await client.get("/health")).status == 503
    before = await sim_metric(client, "sglang:realtime_tokens_total", mode="decode")
    await asyncio.sleep(0.15)  # a bounded look for progress that must not happen
    assert await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") == before
    assert (await client.post("/continue_generation")).status == 200
    events = sim_json_events(await sim_read_sse(resp))
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 30}


async def test_pause_abort_and_retract_modes(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005)
    resp = await start_stream(client, "a")
    await client.post("/pause_generation", json={"mode": "abort"})
    events = sim_json_events(await sim_read_sse(resp))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    # While paused, new requests wait in the queue.
    queued = asyncio.create_task(
        client.post(
            "/generate",
            json={"text": "b", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}},
        )
    )

    async def one_queued() -> bool:  # gauges wait for a log point; the live state does not
        return (await sim_live_state(client))["num_queue_reqs"] == 1

    await sim_wait_for(one_queued)
    await client.post("/continue_generation")
    out = await (await asyncio.wait_for(queued, 5)).json()
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["queue_time"] > 0
    # Retract: running requests go back to the queue and resume after continue.
    resp = await start_stream(client, "c", fixed(40))
    await client.post("/pause_generation", json={"mode": "retract"})
    live = await sim_live_state(client)
    assert live["num_queue_reqs"] == 1 and live["num_running_reqs"] == 0
    await client.post("/continue_generation")
    events = sim_json_events(await sim_read_sse(resp))
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert events[-1]["meta_info"]["num_retractions"] == 1
    bad = await client.post("/pause_generation", json={"mode": "sideways"})
    assert bad.status == 400


async def test_flush_cache_refused_while_running(sim_client_factory: SimClientFactory):
    """entrypoints/http_server.py `flush_cache`: a busy scheduler refuses
    (`Scheduler.flush_cache`), answered 400 with `ret.message or "Flush cache failed.\\n"`."""
    client = await sim_client_factory(itl=0.005)
    resp = await start_stream(client, "x")
    for method in ("GET", "POST"):
        busy = await client.request(method, "/flush_cache")
        assert busy.status == 400 and await busy.text() == "Flush cache failed.\n"
    await client.post("/abort_request", json={"abort_all": True})
    await sim_read_sse(resp)

    async def idle() -> bool:
        return (await client.post("/flush_cache")).status == 200

    await sim_wait_for(idle)


async def test_queue_beyond_max_running_requests(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005, max_running_requests=1)
    first = await start_stream(client, "1", fixed(20))
    second = asyncio.create_task(
        client.post("/generate", json={"text": "2", "sampling_params": {"max_new_tokens": 2}})
    )

    async def queued() -> bool:
        return (await sim_live_state(client))["num_queue_reqs"] == 1

    await sim_wait_for(queued)
    assert (await sim_live_state(client))["num_running_reqs"] == 1
    await sim_read_sse(first)
    out = await (await asyncio.wait_for(second, 5)).json()
    assert out["meta_info"]["queue_time"] > 0.01


# -- prefix cache ---------------------------------------------------------------------
async def test_prefix_cache_hits_lower_ttft(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(prefill_per_token=0.0004, ttft_base=0.002)
    prompt = "Shared system prompt about availability. " * 30  # ~600 tokens

    async def ttft(text: str) -> tuple[float, dict[str, Any]]:
        t0 = time.monotonic()
        resp = await client.post(
            "/generate",
            json={"text": text, "stream": True, "sampling_params": {"max_new_tokens": 3}},
        )
        first = await next_event(resp)
        elapsed = time.monotonic() - t0
        events = sim_json_events(await sim_read_sse(resp))
        return elapsed, (events[-1] if events else first)["meta_info"]

    cold, meta_cold = await ttft(prompt)
    warm, meta_warm = await ttft(prompt)
    assert meta_cold["cached_tokens"] == 0
    assert meta_warm["cached_tokens"] >= meta_warm["prompt_tokens"] - 16
    assert warm < cold * 0.5, (warm, cold)
    assert await sim_metric(client, "sglang:cached_tokens_total") == meta_warm["cached_tokens"]
    assert await sim_metric(client, "sglang:cache_hit_rate") > 0
    # OpenAI usage reports it where SGLang does (with --enable-cache-report).
    usage = (
        await (
            await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        ).json()
    )["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    # A continuation (prompt + generated text) hits the cache, generated part included.
    out = await (
        await client.post(
            "/generate",
            json={"text": prompt, "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}},
        )
    ).json()
    cont = await (
        await client.post(
            "/generate",
            json={"text": prompt + out["text"], "sampling_params": {"max_new_tokens": 1}},
        )
    ).json()
    assert cont["meta_info"]["cached_tokens"] >= meta_warm["prompt_tokens"] + 32
    assert (await client.post("/flush_cache")).status == 200
    again = await (
        await client.post(
            "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}}
        )
    ).json()
    assert again["meta_info"]["cached_tokens"] == 0


# -- metrics and disconnects -----------------------------------------------------------
async def test_gen_throughput_is_published_at_the_decode_log_point(
    sim_client_factory: SimClientFactory,
):
    # SGLang publishes tokens / seconds since the last log point every
    # decode_log_interval (40) decode iterations; 40 tokens at 10 ms each take at
    # least 0.4 s, so the value is above 0 and at most 100 tokens/s.
    client = await sim_client_factory(itl=0.01)
    resp = await start_stream(client, "throughput", fixed(200))
    assert await sim_metric(client, "sglang:gen_throughput") == 0, "nothing logged yet"

    async def past_the_log_point() -> bool:
        return await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") > 40

    await sim_wait_for(past_the_log_point)
    assert 0 < await sim_metric(client, "sglang:gen_throughput") <= 100
    await sim_read_sse(resp)


async def test_metrics_names_and_counts_at_request_end(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.01)
    resp = await start_stream(client, "count", fixed(40))
    assert await sim_metric(client, "sglang:num_running_reqs") == 1  # published at prefill
    for _ in range(5):
        await next_event(resp)

    async def decoding() -> bool:
        return await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") > 1

    await sim_wait_for(decoding)  # per-iteration progress, visible while it runs
    # The request counters move only when the request finishes (SGLang's tokenizer side).
    assert await sim_metric(client, "sglang:generation_tokens_total") == 0
    assert await sim_metric(client, "sglang:num_requests_total") == 0
    await sim_read_sse(resp)
    assert await sim_metric(client, "sglang:generation_tokens_total") == 40
    assert await sim_metric(client, "sglang:num_requests_total") == 1
    assert await sim_metric(client, "sglang:realtime_tokens_total", mode="decode") == 40
    text = await (await client.get("/metrics")).text()
    for name in [
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:gen_throughput",
        "sglang:cache_hit_rate",
        "sglang:token_usage",
        "sglang:num_used_tokens",
        "sglang:max_total_num_tokens",
        "sglang:utilization",
        "sglang:realtime_tokens_total",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:num_requests_total",
        "sglang:time_to_first_token_seconds_bucket",
        "sglang:inter_token_latency_seconds_bucket",
        "sglang:e2e_request_latency_seconds_bucket",
        "sglang:queue_time_seconds_bucket",
    ]:
        lines = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert lines and all('model_name="sglang-ha-simulator"' in line for line in lines), name


async def test_client_disconnect_aborts_generation(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005)
    for path, body in [
        ("/generate", {"text": "bye", "stream": True, "sampling_params": LONG}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "bye"}],
                "stream": True,
                "max_tokens": 2000,
                "ignore_eos": True,
            },
        ),
    ]:
        before = await sim_metric(client, "sglang:num_aborted_requests_total")
        resp = await client.post(path, json=body)
        await next_event(resp)
        resp.close()  # the client goes away mid-stream

        async def cleaned_up(before: float = before) -> bool:
            return (
                await sim_metric(client, "sglang:num_running_reqs") == 0
                and await sim_metric(client, "sglang:num_aborted_requests_total") == before + 1
            )

        await sim_wait_for(cleaned_up)


async def test_non_stream_client_disconnect_aborts(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005)
    task = asyncio.create_task(
        client.post("/generate", json={"text": "x", "sampling_params": LONG})
    )

    async def running() -> bool:
        return await sim_metric(client, "sglang:num_running_reqs") == 1

    await sim_wait_for(running)
    task.cancel()  # closes the connection

    async def aborted() -> bool:
        return await sim_metric(client, "sglang:num_aborted_requests_total") == 1

    await sim_wait_for(aborted)
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_text_and_input_ids_are_the_same_prompt(sim_client: TestClient):
    prompt = "Ünïcode and ASCII, {json}: fine"
    params = {"max_new_tokens": 12, "sampling_seed": 9}
    by_text = await (
        await sim_client.post("/generate", json={"text": prompt, "sampling_params": params})
    ).json()
    by_ids = await (
        await sim_client.post(
            "/generate",
            json={"input_ids": get_tokenizer().encode(prompt), "sampling_params": params},
        )
    ).json()
    assert by_text["output_ids"] == by_ids["output_ids"]
    assert by_text["meta_info"]["prompt_tokens"] == by_ids["meta_info"]["prompt_tokens"]
    # SGLang's health probe: input_ids [0], one token.
    probe = await sim_client.post(
        "/generate",
        json={"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
    )
    assert (await probe.json())["meta_info"]["completion_tokens"] == 1


async def test_64_concurrent_streams_are_cheap(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.01)
    body = {"stream": True, "sampling_params": {"max_new_tokens": 30, "ignore_eos": True}}

    async def one(i: int) -> int:
        resp = await client.post("/generate", json={**body, "text": f"load {i}"})
        return len(sim_json_events(await sim_read_sse(resp))[-1]["output_ids"])

    t0 = time.monotonic()
    counts = await asyncio.gather(*(one(i) for i in range(64)))
    elapsed = time.monotonic() - t0
    assert counts == [30] * 64
    assert elapsed < 3.0, elapsed  # ideal 0.3 s; generous for a loaded 2-core machine


async def test_shutdown_ends_even_hung_requests(sim_client_factory: SimClientFactory):
    client = await sim_client_factory(itl=0.005)
    _running = await start_stream(client, "x")  # held open while the server shuts down
    await client.post("/sim/faults", json={"hang": True})
    t0 = time.monotonic()
    await asyncio.wait_for(client.close(), 5)
    assert time.monotonic() - t0 < 5
