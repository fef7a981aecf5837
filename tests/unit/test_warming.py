"""Warm standby: live requests leave their prefixes in the standby's cache."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx

from ha_agent.gateway.upstream.warming import Warmer, prefill_only, prefix_key
from ha_agent.openapi.endpoints import CHAT, GENERATE
from tests.support.cluster import local_cluster
from tests.support.fakes import FakeClock
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


class RecordingWarmer(Warmer):
    """The real selection logic; the standby is given and sends are recorded."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(None, None, rate=2.0, registry=None, clock=clock)  # type: ignore[arg-type]
        self.node = SimpleNamespace(name="sglang-02")
        self.sent: list[str] = []

    def standby(self):  # type: ignore[no-untyped-def]
        return self.node

    def offer(self, kind: str, body: dict[str, object]) -> None:
        super().offer(kind, body)
        if self._inflight:
            self.sent.append(str(body["messages"][0]["content"])[:12])  # type: ignore[index]
            for task in list(self._inflight):
                task.cancel()
            self._inflight.clear()

    async def _send(self, node: object, path: str, body: dict[str, object]) -> None:
        return None


def doc_request(doc: int, question: int) -> dict[str, object]:
    content = f"Document {doc:02d} " + "lorem ipsum " * 200 + f"Question {question}"
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


async def test_the_budget_goes_to_prefixes_the_standby_lacks() -> None:
    clock = FakeClock()
    warmer = RecordingWarmer(clock)
    # 16 requests/s, round-robin over 10 documents: plain 2/s sampling would take
    # every 8th request and only ever see the even documents.
    for k in range(160):
        warmer.offer(CHAT, doc_request(k % 10, k // 10))
        clock.advance(1 / 16)
    assert len(set(warmer.sent)) == 10, warmer.sent
    assert len(warmer.sent) == 10, "a warm prefix is not mirrored again within RECENT_S"


async def test_a_new_standby_is_warmed_from_scratch() -> None:
    clock = FakeClock()
    warmer = RecordingWarmer(clock)
    warmer.offer(CHAT, doc_request(1, 0))
    clock.advance(1.0)
    warmer.offer(CHAT, doc_request(1, 1))
    assert len(warmer.sent) == 1
    warmer.node = SimpleNamespace(name="sglang-01")  # after a failover
    warmer.offer(CHAT, doc_request(1, 2))
    assert len(warmer.sent) == 2


def test_prefix_key_ignores_the_varying_tail_only() -> None:
    a, b = doc_request(3, 0), doc_request(3, 1)
    assert prefix_key(CHAT, a) == prefix_key(CHAT, b)
    assert prefix_key(CHAT, a) != prefix_key(CHAT, doc_request(4, 0))
    assert prefix_key(GENERATE, {"text": "short"}) == prefix_key(GENERATE, {"text": "other"})
