"""Warm standby: live requests leave their prefixes in the standby's cache."""

from __future__ import annotations

import asyncio

import httpx

from ha_agent.gateway.migration import CHAT, GENERATE
from ha_agent.gateway.warming import prefill_only
from tests.support.cluster import local_cluster
from tests.support.processes import RedisProcess

PROMPT = "You are a support assistant for an HA inference appliance. " * 20


def test_mirrors_are_prefill_only_and_unconstrained() -> None:
    body = {
        "text": "x",
        "stream": True,
        "rid": "user-1",
        "sampling_params": {"max_new_tokens": 500, "json_schema": "{}"},
    }
    mirror = prefill_only(GENERATE, body)
    assert mirror is not None
    assert mirror["sampling_params"] == {"max_new_tokens": 1}
    assert mirror["stream"] is False and mirror["rid"].startswith("HA_WARM_")
    assert body["sampling_params"]["max_new_tokens"] == 500, "the user's request is untouched"
    chat = prefill_only(
        CHAT,
        {
            "messages": [],
            "max_completion_tokens": 9,
            "stream": True,
            "response_format": {"type": "json_object"},
            "n": 2,
        },
    )
    assert chat is not None and chat["max_tokens"] == 1 and "response_format" not in chat
    assert "n" not in chat and "max_completion_tokens" not in chat


async def standby_cached_tokens(url: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(
            f"{url}/generate", json={"text": PROMPT, "sampling_params": {"max_new_tokens": 1}}
        )
        return int(r.json()["meta_info"]["cached_tokens"])


async def run(redis_proc: RedisProcess, warm_rate: float) -> tuple[int, float]:
    async with local_cluster(redis_proc, relay=False) as cluster:
        await cluster.start_relay(warm_rate=warm_rate)
        primary = await cluster.wait_ready()
        standby = cluster.other(primary)
        assert cluster.relay is not None
        async with httpx.AsyncClient(timeout=10) as client:
            for _ in range(3):
                r = await client.post(
                    f"{cluster.relay_url}/generate",
                    json={"text": PROMPT, "sampling_params": {"max_new_tokens": 4}},
                )
                assert r.status_code == 200 and r.headers["X-SGLang-HA-Node"] == primary
                await asyncio.sleep(0.6)  # the bucket refills at warm_rate per second
        await asyncio.sleep(0.5)  # let mirrors in flight land
        cached = await standby_cached_tokens(cluster.nodes[standby].engine_url)
        user = sum(
            s.value
            for s in cluster.relay.metrics.requests.collect()[0].samples
            if s.name.endswith("_total")
        )
        return cached, user


async def test_standby_cache_is_warm_only_with_mirroring(redis_proc: RedisProcess) -> None:
    cached_on, user_on = await run(redis_proc, warm_rate=2.0)
    assert cached_on > 100, "the prompt's prefix is in the standby's cache"
    assert user_on == 3, "mirrors are not counted as user requests"


async def test_no_mirroring_leaves_the_standby_cold(redis_proc: RedisProcess) -> None:
    cached_off, _ = await run(redis_proc, warm_rate=0.0)
    assert cached_off == 0
