"""Contract tests: the simulator behaves as SGLang 0.5.19 does, point by point.

Each test's docstring names the SGLang source file (``python/sglang/...``) it mirrors;
docs/simulator.md lists them in its "Faithful to SGLang" table.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import ClientResponse
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import (
    SimClientFactory,
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
