"""The relay with real agents, real simulator processes and a real Redis.

Faults are real: the primary's engine process is SIGKILLed or SIGSTOPped while
requests run. What a user checks: no failed request, streams that continue with
exactly the text an uninterrupted run gives (the simulator is deterministic), the
requested budget and the original prompt's usage, 4xx that pass through untouched.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.cluster import LocalCluster, collect_stream, local_cluster
from tests.support.processes import RedisProcess

LONG = 120  # tokens: about 0.6 s at the simulator's test speed


@pytest.fixture
async def cluster(redis_proc: RedisProcess) -> AsyncIterator[LocalCluster]:
    async with local_cluster(redis_proc) as c:
        await c.wait_ready()
        yield c


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def test_requests_go_to_the_primary(cluster: LocalCluster, http: httpx.AsyncClient) -> None:
    primary = cluster.primary()
    r = await http.post(
        f"{cluster.relay_url}/generate",
        json={"text": "hi", "sampling_params": {"max_new_tokens": 4}},
    )
    assert r.status_code == 200
    assert r.headers["X-SGLang-HA-Node"] == primary
    async with http.stream(
        "POST",
        f"{cluster.relay_url}/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 5,
        },
    ) as resp:
        assert resp.headers["X-SGLang-HA-Node"] == primary
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = (await resp.aread()).decode()
    assert body.endswith("data: [DONE]\n\n")


async def test_client_errors_pass_through_and_are_never_retried(
    cluster: LocalCluster, http: httpx.AsyncClient
) -> None:
    assert cluster.relay is not None
    for body in (b"{broken", b"[1, 2]"):
        r = await http.post(f"{cluster.relay_url}/v1/completions", content=body)
        assert r.status_code == 400
        assert "JSON" in r.json()["message"]
    r = await http.post(
        f"{cluster.relay_url}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": -5}
    )
    assert r.status_code == 400
    r = await http.get(f"{cluster.relay_url}/no/such/path")
    assert r.status_code == 404
    retries = cluster.relay.metrics.retries.collect()[0].samples
    assert not [s for s in retries if s.value > 0], "a 4xx must never be retried"
    assert all(v.can_serve(0) or True for v in cluster.relay.topology.nodes.values())
    assert not any(v.failed for v in cluster.relay.topology.nodes.values())


async def test_crash_of_the_primary_fails_no_request(
    cluster: LocalCluster, http: httpx.AsyncClient
) -> None:
    primary = cluster.primary()
    assert primary is not None
    body = {"text": "Tell me a story", "sampling_params": {"max_new_tokens": 40}}

    async def one() -> int:
        r = await http.post(f"{cluster.relay_url}/generate", json=body)
        return r.status_code

    inflight = [asyncio.ensure_future(one()) for _ in range(20)]
    await asyncio.sleep(0.1)
    cluster.kill_engine(primary)
    after = [asyncio.ensure_future(one()) for _ in range(20)]
    codes = await asyncio.gather(*inflight, *after)
    assert codes == [200] * 40
    other = cluster.other(primary)
    await cluster.wait_for(lambda: cluster.primary() == other, 10, f"{other} promoted")
    log = cluster.ha_log(other)
    assert f"FAILOVER_INITIATED from {primary} to {other}" in log


async def test_engine_500s_are_retried_on_the_other_node(
    cluster: LocalCluster, http: httpx.AsyncClient
) -> None:
    primary, sim = cluster.primary_sim()
    await sim.faults(error_rate=1.0)
    for _ in range(10):
        r = await http.post(
            f"{cluster.relay_url}/v1/completions",
            json={"model": "m", "prompt": "x", "max_tokens": 3},
        )
        assert r.status_code == 200
        assert r.headers["X-SGLang-HA-Node"] == cluster.other(primary)


async def test_non_stream_requests_on_a_hung_primary_are_resent(
    cluster: LocalCluster, http: httpx.AsyncClient
) -> None:
    primary, sim = cluster.primary_sim()
    body = {"text": "x", "sampling_params": {"max_new_tokens": LONG, "ignore_eos": True}}
    pending = [
        asyncio.ensure_future(http.post(f"{cluster.relay_url}/generate", json=body))
        for _ in range(5)
    ]
    await asyncio.sleep(0.2)
    await sim.faults(hang=True)
    responses = await asyncio.wait_for(asyncio.gather(*pending), timeout=20)
    assert [r.status_code for r in responses] == [200] * 5
    assert {r.headers["X-SGLang-HA-Node"] for r in responses} == {cluster.other(primary)}


# -- stream migration -------------------------------------------------------------------


async def reference(cluster: LocalCluster, node: str, path: str, body: dict[str, Any]) -> list[str]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await collect_stream(client, cluster.nodes[node].engine_url + path, body)


async def broken_stream(
    cluster: LocalCluster,
    path: str,
    body: dict[str, Any],
    after_events: int = 15,
    fault: str = "kill",
) -> tuple[list[str], str]:
    """Stream through the relay and break the primary's engine after some events."""
    primary = cluster.primary()
    assert primary is not None

    async def on_event(events: list[str], _: httpx.Response) -> None:
        if len(events) == after_events:
            if fault == "kill":
                cluster.kill_engine(primary)
            else:
                cluster.freeze_engine(primary)

    async with httpx.AsyncClient(timeout=30) as client:
        events = await collect_stream(client, cluster.relay_url + path, body, on_event)
    return events, primary


def generate_stream(prompt: list[int] | str, tokens: int = LONG, **extra: Any) -> dict[str, Any]:
    """A streaming /generate body for exactly ``tokens`` tokens (EOS ignored)."""
    key = "input_ids" if isinstance(prompt, list) else "text"
    sampling = {"max_new_tokens": tokens, "ignore_eos": True}
    return {key: prompt, **extra, "stream": True, "sampling_params": sampling}


def openai_stream(seed: int, budget: str = "max_tokens", **fields: Any) -> dict[str, Any]:
    """A streaming OpenAI body (``prompt=`` or ``messages=`` in ``fields``) for exactly
    LONG tokens, its budget under the key ``budget``."""
    return {"model": "m", **fields, budget: LONG, "ignore_eos": True, "stream": True, "seed": seed}


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def last_json(events: list[str]) -> dict[str, Any]:
    return json.loads(next(e for e in reversed(events) if e.startswith("{")))


async def test_generate_stream_with_input_ids_continues_byte_for_byte(
    cluster: LocalCluster,
) -> None:
    body = generate_stream([5, 6, 7, 300, 301])
    events, primary = await broken_stream(cluster, "/generate", body)
    expected = await reference(cluster, cluster.other(primary), "/generate", body)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    got, want = last_json(events), last_json(expected)
    assert got["text"] == want["text"]
    assert got["output_ids"] == want["output_ids"]
    assert got["meta_info"]["completion_tokens"] == want["meta_info"]["completion_tokens"] == LONG
    assert got["meta_info"]["prompt_tokens"] == want["meta_info"]["prompt_tokens"]
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    texts = [json.loads(e)["text"] for e in events if e.startswith("{")]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts)), "text only grows"
    assert "STREAM_MIGRATED" in cluster.ha_log("relay")


async def test_generate_stream_with_text_continues(cluster: LocalCluster) -> None:
    body = {"text": "Once upon a time", "stream": True, "sampling_params": {"max_new_tokens": LONG}}
    events, primary = await broken_stream(cluster, "/generate", body)
    expected = await reference(cluster, cluster.other(primary), "/generate", body)
    assert last_json(events)["text"] == last_json(expected)["text"]
    assert events.count("[DONE]") == 1


async def test_completions_stream_continues_with_usage_counted_once(cluster: LocalCluster) -> None:
    body = openai_stream(7, prompt="The quick brown fox", stream_options={"include_usage": True})
    events, primary = await broken_stream(cluster, "/v1/completions", body)
    expected = await reference(cluster, cluster.other(primary), "/v1/completions", body)

    def text_and_usage(evts: list[str]) -> tuple[str, dict[str, Any], set[str]]:
        chunks = [json.loads(e) for e in evts if e.startswith("{")]
        text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        usage = next(c["usage"] for c in reversed(chunks) if c.get("usage"))
        return text, usage, {c["id"] for c in chunks}

    got_text, got_usage, ids = text_and_usage(events)
    want_text, want_usage, _ = text_and_usage(expected)
    assert got_text == want_text
    assert got_usage["completion_tokens"] == want_usage["completion_tokens"]
    assert got_usage["prompt_tokens"] == want_usage["prompt_tokens"]
    assert got_usage["total_tokens"] == want_usage["total_tokens"]
    assert got_usage["completion_tokens"] == LONG, "exactly the requested budget"
    assert len(ids) == 1, "one response id across the migration"
    assert events.count("[DONE]") == 1
    # The relay counts by running usage it asked for; the client did not, so its
    # content chunks carry "usage": null, as SGLang's own would.
    content = [json.loads(e) for e in events if e.startswith("{")][:-1]
    assert content and all(c["usage"] is None for c in content)


async def chat_events(cluster: LocalCluster, body: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The chunks of a chat stream broken mid-way, and of the same request run on
    the other node without a break."""
    events, primary = await broken_stream(cluster, "/v1/chat/completions", body)
    expected = await reference(cluster, cluster.other(primary), "/v1/chat/completions", body)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert "STREAM_MIGRATED" in cluster.ha_log("relay")
    return [json.loads(e) for e in events[:-1]], [json.loads(e) for e in expected[:-1]]


async def test_chat_stream_keeps_the_budget_and_running_usage_across_a_migration(
    cluster: LocalCluster,
) -> None:
    body = openai_stream(
        11,
        "max_completion_tokens",
        messages=user("Count the ways a lease can expire."),
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    got, want = await chat_events(cluster, body)
    content = [c for c in got if c["choices"] and c["choices"][0]["delta"].get("content")]
    running = [c["usage"] for c in content]
    assert len(running) == len(content), "running usage on every content chunk"
    done = [u["completion_tokens"] for u in running]
    assert done == sorted(done) and done[-1] == LONG
    assert {u["prompt_tokens"] for u in running} == {want[-1]["usage"]["prompt_tokens"]}
    assert got[-1]["choices"] == [] and got[-1]["usage"] == want[-1]["usage"]
    assert got[-1]["usage"]["completion_tokens"] == LONG
    finishes = [c["choices"][0]["finish_reason"] for c in got if c["choices"]]
    assert [f for f in finishes if f] == ["length"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"])
    assert text == "".join(
        c["choices"][0]["delta"].get("content") or "" for c in want if c["choices"]
    )


async def test_chat_stream_without_stream_options_gets_no_usage_after_a_migration(
    cluster: LocalCluster,
) -> None:
    body = openai_stream(5, messages=user("Describe a fencing token."))
    got, want = await chat_events(cluster, body)
    assert all("usage" not in c for c in got), "SGLang omits usage nobody asked for"
    assert all("usage" not in c for c in want)
    roles = [c for c in got if c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in got if c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]


async def test_chat_stream_continues_through_the_openai_client(cluster: LocalCluster) -> None:
    import openai

    primary = cluster.primary()
    assert primary is not None
    messages = [{"role": "user", "content": "Write a long poem about failover."}]
    client = openai.AsyncOpenAI(base_url=cluster.relay_url + "/v1", api_key="none", max_retries=0)
    stream = await client.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=LONG,
        stream=True,
        seed=3,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    roles = 0
    usage = None
    finish = None
    count = 0
    async for chunk in stream:
        count += 1
        if count == 15:
            cluster.kill_engine(primary)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += 1 if choice.delta.role else 0
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    direct = openai.AsyncOpenAI(
        base_url=cluster.nodes[cluster.other(primary)].engine_url + "/v1", api_key="none"
    )
    want = await direct.chat.completions.create(
        model="m",
        messages=messages,
        max_tokens=LONG,
        seed=3,  # type: ignore[arg-type]
    )
    assert "".join(pieces) == want.choices[0].message.content
    assert finish == want.choices[0].finish_reason
    assert roles == 1, "exactly one role chunk"
    assert usage is not None and want.usage is not None
    assert usage.completion_tokens == want.usage.completion_tokens
    assert usage.prompt_tokens == want.usage.prompt_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    await client.close()
    await direct.close()


async def test_constrained_stream_ends_with_an_explicit_retryable_error(
    cluster: LocalCluster,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 40,
                "maxItems": 40,
                "items": {"type": "string", "minLength": 8, "maxLength": 8},
            }
        },
        "required": ["items"],
    }
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "list"}],
        "stream": True,
        "max_tokens": 2000,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    events, _ = await broken_stream(cluster, "/v1/chat/completions", body, after_events=5)
    errors = [json.loads(e) for e in events if e.startswith('{"error"')]
    assert len(errors) == 1 and errors[0]["error"]["retryable"] is True
    assert "grammar-constrained" in errors[0]["error"]["message"]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1


async def test_frozen_primary_stream_moves_on(cluster: LocalCluster) -> None:
    body = generate_stream([1, 2, 3])
    events, primary = await broken_stream(cluster, "/generate", body, fault="freeze")
    try:
        expected = await reference(cluster, cluster.other(primary), "/generate", body)
        assert last_json(events)["output_ids"] == last_json(expected)["output_ids"]
    finally:
        cluster.thaw_engine(primary)


async def test_second_failure_during_a_migrated_stream(cluster: LocalCluster) -> None:
    first = cluster.primary()
    assert first is not None
    second = cluster.other(first)
    body = generate_stream([9, 9, 9], 400)
    expected = await reference(cluster, second, "/generate", body)

    async def on_event(events: list[str], _: httpx.Response) -> None:
        if len(events) == 20:
            cluster.kill_engine(first)
            cluster.start_engine(first)  # it comes back (supervisord would restart it)
        if len(events) == 120:
            cluster.kill_engine(second)

    async with httpx.AsyncClient(timeout=60) as client:
        events = await collect_stream(client, cluster.relay_url + "/generate", body, on_event)
    assert last_json(events)["output_ids"] == last_json(expected)["output_ids"]
    assert events.count("[DONE]") == 1


# -- engine-side aborts ----------------------------------------------------------------


async def test_engine_abort_is_migrated_like_a_break(cluster: LocalCluster) -> None:
    """SGLang ends a request itself when a retracted request's KV backup does not fit the
    host pool (500, schedule_batch.py retract_decode: the node's memory pressure): an
    error event on the OpenAI endpoints (serving_chat.py). The client must see neither
    the error nor a short answer."""
    status = 500
    primary, sim = cluster.primary_sim()
    body = openai_stream(
        2, messages=user("Tell me about leases."), stream_options={"include_usage": True}
    )
    expected = await reference(cluster, cluster.other(primary), "/v1/chat/completions", body)
    await sim.faults(abort_after_tokens=30, abort_cause="retract_host_pool")
    async with httpx.AsyncClient(timeout=30) as client:
        events = await collect_stream(client, cluster.relay_url + "/v1/chat/completions", body)
    assert not [e for e in events if '"error"' in e]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    got = [json.loads(e) for e in events[:-1]]
    want = [json.loads(e) for e in expected[:-1]]

    def text(chunks: list[Any]) -> str:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )

    assert text(got) == text(want)
    assert got[-1]["usage"]["completion_tokens"] == LONG
    assert got[-1]["usage"]["prompt_tokens"] == want[-1]["usage"]["prompt_tokens"]
    log = cluster.ha_log("relay")
    assert f"STREAM_MIGRATED chat stream from {primary} after" in log
    assert f"engine abort {status}" in log


async def test_generate_engine_abort_continues_from_the_token_ids(cluster: LocalCluster) -> None:
    primary, sim = cluster.primary_sim()
    body = generate_stream([11, 12, 13, 14])
    expected = await reference(cluster, cluster.other(primary), "/generate", body)
    await sim.faults(abort_after_tokens=40, abort_cause="retract_host_pool")
    async with httpx.AsyncClient(timeout=30) as client:
        events = await collect_stream(client, cluster.relay_url + "/generate", body)
    got, want = last_json(events), last_json(expected)
    assert got["output_ids"] == want["output_ids"]
    assert got["meta_info"]["finish_reason"] == {"type": "length", "length": LONG}
    assert got["meta_info"]["completion_tokens"] == LONG
    assert got["meta_info"]["prompt_tokens"] == 4
    assert "STREAM_MIGRATED" in cluster.ha_log("relay")


@pytest.mark.parametrize("cause", ["running_timeout", "oom_after_retract"])
async def test_an_abort_the_request_caused_is_its_answer_not_a_node_fault(
    cluster: LocalCluster, cause: str
) -> None:
    """A running timeout (503) or a request too big for the KV pool alone (500) would end
    the same way on the other node: the client gets SGLang's error, nothing migrates,
    and a non-stream request is not re-sent."""
    primary, sim = cluster.primary_sim()
    await sim.faults(abort_after_tokens=10, abort_cause=cause)
    body = openai_stream(2, messages=user("Tell me about leases."))
    async with httpx.AsyncClient(timeout=30) as client:
        events = await collect_stream(client, cluster.relay_url + "/v1/chat/completions", body)
        plain = await client.post(
            cluster.relay_url + "/v1/chat/completions", json={**body, "stream": False}
        )
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] in (500, 503)
    assert plain.status_code == error["code"]
    assert plain.headers["X-SGLang-HA-Node"] == primary, "not re-sent to the other node"
    assert "STREAM_MIGRATED" not in cluster.ha_log("relay")
    assert cluster.primary() == primary


async def test_a_client_abort_ends_the_stream_and_is_not_migrated(cluster: LocalCluster) -> None:
    """/abort_request ends a request with an abort that has no status code: the
    request's own end (tokenizer_manager.py), passed through as SGLang sent it."""
    primary = cluster.primary()
    assert primary is not None
    body = generate_stream("abort me", 2000, rid="client-abort-1")

    async def on_event(events: list[str], resp: httpx.Response) -> None:
        if len(events) == 5:
            # The engine knows the relay's rid for it (policy.py), named in a header.
            assert resp.headers["X-SGLang-HA-Client-Rid"] == "client-abort-1"
            r = await client.post(
                cluster.nodes[primary].engine_url + "/abort_request",
                json={"rid": resp.headers["X-SGLang-HA-Rid"]},
            )
            assert r.status_code == 200

    async with httpx.AsyncClient(timeout=30) as client:
        events = await collect_stream(client, cluster.relay_url + "/generate", body, on_event)
    finish = last_json(events)["meta_info"]["finish_reason"]
    assert finish["type"] == "abort" and finish.get("status_code") is None
    assert last_json(events)["meta_info"]["completion_tokens"] < 2000
    assert "STREAM_MIGRATED" not in cluster.ha_log("relay")


async def test_a_stream_queued_in_the_engine_has_not_begun_until_its_first_event(
    redis_proc: RedisProcess, http: httpx.AsyncClient
) -> None:
    """The wait estimate counts a stream's slot from its first event back (wait.py):
    on an engine of one running slot, a second stream waits in the engine's queue
    with nothing back, and begins once the first has left."""
    async with local_cluster(redis_proc, sim_env={"SIM_MAX_RUNNING_REQUESTS": "1"}) as c:
        primary = await c.wait_ready()
        assert c.relay is not None
        node = c.relay.topology.nodes[primary]
        body = {"text": "hi", "sampling_params": {"max_new_tokens": LONG}, "stream": True}
        url = f"{c.relay_url}/generate"
        first = asyncio.ensure_future(collect_stream(http, url, body))
        await c.wait_for(lambda: any(a.began for a in node.inflight), 10, "the first to begin")
        second = asyncio.ensure_future(collect_stream(http, url, body))
        await c.wait_for(lambda: len(node.inflight) == 2, 10, "the second on the engine")
        assert [a.stream for a in node.inflight] == [True, True]
        assert sum(a.began is None for a in node.inflight) == 1  # queued: nothing back
        assert (await first)[-1] == "[DONE]"
        await c.wait_for(lambda: all(a.began for a in node.inflight), 10, "the second to begin")
        assert (await second)[-1] == "[DONE]"


async def test_a_moved_stream_is_timed_by_the_tokens_it_had_left(cluster: LocalCluster) -> None:
    """The wait estimate times each request in a slot by its budget (wait.py): a moved
    stream's continuation holds only what it had left, and its decode on the survivor
    is a service time sample for that many tokens."""
    primary = cluster.primary()
    assert cluster.relay is not None
    survivor = cluster.other(primary)
    nodes = cluster.relay.topology.nodes
    seen: dict[str, list[int | None]] = {primary: [], survivor: []}

    async def on_event(events: list[str], _: httpx.Response) -> None:
        for name in seen:
            seen[name] += [a.budget for a in nodes[name].inflight]
        if len(events) == 15:
            cluster.kill_engine(primary)

    body = generate_stream("a story", tokens=LONG)
    async with httpx.AsyncClient(timeout=30) as client:
        events = await collect_stream(client, cluster.relay_url + "/generate", body, on_event)
    assert events[-1] == "[DONE]"
    assert set(seen[primary]) == {LONG}, seen
    (moved,) = set(seen[survivor])  # what it had left when the primary died
    assert moved is not None and 0 < moved < LONG
    # The one sample on the survivor: its decode there, for that many tokens.
    service, budgets = cluster.relay.relay.admission.wait.service._nodes[survivor]
    assert budgets.count == 1 and budgets.value == moved
    assert 0 < service.value < 30
