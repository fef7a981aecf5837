"""Overload, heavy requests and a query of death never cost the pair.

- Heavy requests (4 MB and 15 MB prompts, under the gateway's 16 MB body limit, and a
  nested regex) are refused by the relay with a 400 before any engine tokenizes them
  (the median of three tries of each under 100 ms end to end, every try under 1 s),
  the client's next request is served, and the engine's /metrics
  stays under 100 ms meanwhile.
- 60 s of a saturating load with a flood of bad input at the same time: 0 role
  changes, 0 failed valid requests (a 429 with Retry-After is *shed*, reported
  apart), every bad request answered 4xx quickly, nothing hangs past its timeout.
- A query of death (the simulator's crash_marker) under load: each node dies at most
  once for it and never both at once, the relay quarantines it alone (503,
  QUERY_QUARANTINED, the metric), and everyone else is served throughout.
- The standby's engine hung, then the primary's killed: nothing is quarantined.
- The primary's engine killed (SIGKILL), then the new primary's container killed:
  0 failed requests, nothing quarantined.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from ha_agent.config import EngineHealthSettings
from tests.support import load_watch as watch
from tests.support.background_load import background_load
from tests.support.processes import wait_until
from tests.support.stack import NODES, Stack, overlay_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERLAY = Path(__file__).with_name("overload.compose.yaml")
MAX_RUNNING = 8  # as in the overlay
SHED_BOUND = 8  # as in the overlay
MARKER = "QOD-b7e2"  # as in the overlay
CLIENTS = 4 * MAX_RUNNING  # enough to keep the primary's queue past the bound
DURATION = 60.0
REQUEST_TIMEOUT = 90.0
MB = 1024 * 1024
NESTED_REGEX = "(?:a{1000}){1000}"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with overlay_stack(OVERLAY, "sglang-ha-overload") as s:
        yield s


# A heavy request's median refusal time over its tries, s (docs/security.md's target).
REFUSED_WITHIN = 0.1


class Heavy(NamedTuple):
    """A request the relay must refuse without tokenizing it."""

    what: str
    path: str
    body: str
    # Held to REFUSED_WITHIN (median of its tries); False: to the 1 s every try is held
    # to only, where the time is copying the body through three hops, not the refusal.
    timed: bool = True


def heavy_requests() -> list[Heavy]:
    """Each must be refused by the relay, never tokenized."""
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": "q"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": deep}},
    }
    return [
        Heavy("4MB prompt", "/v1/completions", json.dumps({"model": "m", "prompt": "x" * 4 * MB})),
        Heavy(
            "15MB prompt",
            "/generate",
            json.dumps({"text": "lorem ipsum " * (15 * MB // 12)}),
            timed=False,  # 15 MB through Docker's proxy, Nginx (buffered) and the relay
        ),
        Heavy(
            "nested regex",
            "/generate",
            json.dumps({"text": "q", "sampling_params": {"regex": NESTED_REGEX}}),
        ),
        Heavy("deep schema", "/v1/chat/completions", json.dumps(chat)),
        Heavy("broken JSON", "/v1/completions", "{broken"),
        Heavy(
            "negative max_tokens", "/v1/completions", '{"model":"m","prompt":"x","max_tokens":-5}'
        ),
    ]


def as_bytes(items: list[Heavy]) -> list[tuple[str, str, bytes]]:
    return [(h.what, h.path, h.body.encode()) for h in items]


@dataclass
class Observed:
    ok: int = 0
    shed: int = 0
    shed_without_retry_after: int = 0
    failed: list[str] = field(default_factory=list)
    bad: list[tuple[str, int, float]] = field(default_factory=list)  # (what, status, s)
    metrics_latency: list[float] = field(default_factory=list)
    views: watch.Views = field(default_factory=list)


async def watch_metrics(http: httpx.AsyncClient, engine: str, seen: Observed, until: float) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            await http.get(f"{engine}/metrics", timeout=10)
            seen.metrics_latency.append(time.monotonic() - started)
        except httpx.HTTPError:
            seen.metrics_latency.append(float("inf"))
        await asyncio.sleep(0.1)


async def valid_client(http: httpx.AsyncClient, url: str, seen: Observed, until: float) -> None:
    """Streams of 200 tokens back to back; a 429 waits its Retry-After (bounded)."""
    body = {
        "text": "Tell a long story.",
        "sampling_params": {"max_new_tokens": 200, "ignore_eos": True},
        "stream": True,
    }
    while time.monotonic() < until:
        try:
            async with http.stream(
                "POST", f"{url}/generate", json=body, timeout=REQUEST_TIMEOUT
            ) as r:
                if r.status_code in (429, 503):
                    await r.aread()
                    retry = r.headers.get("Retry-After")
                    if retry is None:
                        seen.shed_without_retry_after += 1
                    seen.shed += 1
                    await asyncio.sleep(min(float(retry or 1), 5.0))
                    continue
                if r.status_code != 200:
                    seen.failed.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                if await watch.stream_completed(r, 200, seen.failed):
                    seen.ok += 1
        except httpx.HTTPError as exc:
            seen.failed.append(f"{type(exc).__name__}: {exc}")


async def bad_client(http: httpx.AsyncClient, url: str, seen: Observed, until: float) -> None:
    items = as_bytes(heavy_requests())
    i = 0
    while time.monotonic() < until:
        what, path, body = items[i % len(items)]
        i += 1
        started = time.monotonic()
        try:
            r = await http.post(
                f"{url}{path}",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=REQUEST_TIMEOUT,
            )
            seen.bad.append((what, r.status_code, time.monotonic() - started))
        except httpx.HTTPError as exc:
            seen.bad.append((f"{what}: {type(exc).__name__}", 0, time.monotonic() - started))


def test_heavy_requests_are_refused_fast_and_keep_the_engine_fast(stack: Stack) -> None:
    primary = stack.wait_stable()
    heavy = heavy_requests()[:3]
    epochs = {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES}

    async def run() -> Observed:
        seen = Observed()
        async with httpx.AsyncClient() as http:
            until = time.monotonic() + 30
            watcher = asyncio.ensure_future(
                watch_metrics(http, stack.engine_url(primary), seen, until)
            )
            await asyncio.sleep(0.5)
            for what, path, body in as_bytes(heavy):
                for _ in range(3):
                    started = time.monotonic()
                    r = await http.post(
                        f"{stack.gateway_url}{path}",
                        content=body,
                        headers={"Content-Type": "application/json"},
                        timeout=30,
                    )
                    seen.bad.append((what, r.status_code, time.monotonic() - started))
                    # The same client's next request, on the connection just used.
                    ok = await http.post(
                        f"{stack.gateway_url}/generate",
                        json={"text": "hi", "sampling_params": {"max_new_tokens": 2}},
                        timeout=30,
                    )
                    if ok.status_code != 200:
                        seen.failed.append(f"after {what}: HTTP {ok.status_code}")
            await asyncio.sleep(0.5)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            seen.views.append((time.monotonic(), {}))
        return seen

    seen = asyncio.run(run())
    print("heavy requests (what, status, s):", [(w, c, round(t, 3)) for w, c, t in seen.bad])
    print(f"engine /metrics max {max(seen.metrics_latency):.3f}s")
    assert {c for _, c, _ in seen.bad} == {400}, seen.bad
    assert not seen.failed, seen.failed
    # End to end through Nginx, which buffers the whole body (past 256 KB in a file on
    # its tmpfs) before passing it on. The relay counts the prompt as it reads the body
    # (gateway/admission/prompt_scan.py) and neither keeps nor parses the rest, but it
    # still reads all of it before answering (policy.py). With Nginx streaming the body
    # through instead, a 15 MB prompt through Docker's port proxy, Nginx and the relay on
    # the 2-core CPU stack took a median of 19-20 ms, at most 38-82 ms per 20 runs;
    # buffered, one run: 45, 47 and 103 ms (2026-12-06, docs/security.md). The
    # median of each request's three tries is held to the target of 100 ms: single tries
    # see outliers on this shared machine (one nested regex took 139 ms in a CI run, its
    # twins 26 and 45 ms). The 15 MB prompt is held to the second only, as every try:
    # its time is copying 15 MB through three hops on 2 shared cores (in CI on d2f0c4a
    # 53, 125 and 189 ms), not the refusal the 4 MB one already shows.
    timed = {h.what for h in heavy if h.timed}
    times: dict[str, list[float]] = {}
    for what, _, took in seen.bad:
        times.setdefault(what, []).append(took)
    slow = {
        w: sorted(t)
        for w, t in times.items()
        if w in timed and statistics.median(t) >= REFUSED_WITHIN
    }
    assert not slow, f"heavy requests were slow: {slow}"
    assert max(t for _, _, t in seen.bad) < 1.0, seen.bad
    # The engine's /metrics stays quick while the heavy requests are refused: nine reads
    # in ten under 100 ms, and not one near the agent's scrape timeout, past which a
    # read counts as unanswered. Not every read under 100 ms: one of ~300 took 120 ms in
    # CI of 3cfa6e0 (bench/results/ci-runs/2026-12-07-3cfa6e0-ci-stop-excerpt.log).
    lat = sorted(seen.metrics_latency)
    assert len(lat) >= 10
    assert lat[int(len(lat) * 0.9)] < 0.1, lat[-5:]
    assert lat[-1] < EngineHealthSettings().scrape_timeout / 2, lat[-5:]
    assert stack.wait_stable(timeout=10) == primary
    assert {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES} == epochs


def test_sixty_seconds_of_saturation_and_bad_input_change_no_role(stack: Stack) -> None:
    primary = stack.wait_stable()
    epochs = {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES}
    logs_before = watch.ha_log_lengths(stack)

    async def run() -> Observed:
        seen = Observed()
        limits = httpx.Limits(max_connections=CLIENTS + 16)
        async with httpx.AsyncClient(limits=limits) as http:
            until = time.monotonic() + DURATION
            url = stack.gateway_url
            tasks = [valid_client(http, url, seen, until) for _ in range(CLIENTS)]
            tasks += [bad_client(http, url, seen, until) for _ in range(2)]
            tasks += [
                watch.watch_agents(stack, http, seen.views, until),
                watch_metrics(http, stack.engine_url(primary), seen, until),
            ]
            # Every request is bounded by REQUEST_TIMEOUT: nothing may hang past it.
            await asyncio.wait_for(asyncio.gather(*tasks), DURATION + REQUEST_TIMEOUT + 10)
        return seen

    seen = asyncio.run(run())
    bad_times = [t for _, c, t in seen.bad]
    print(
        f"valid: {seen.ok} ok, {seen.shed} shed (429/503 + Retry-After), "
        f"{len(seen.failed)} failed; bad: {len(seen.bad)} answered, "
        f"p50 {statistics.median(bad_times):.3f}s max {max(bad_times):.3f}s; "
        f"engine /metrics p50 {statistics.median(seen.metrics_latency):.3f}s "
        f"max {max(seen.metrics_latency):.3f}s"
    )
    changed = watch.role_changes(seen.views, primary, epochs)
    assert not changed, changed[:5]
    moved = watch.moved_lines(stack, logs_before)
    assert not moved, moved
    assert not seen.failed, seen.failed[:5]
    assert seen.ok >= MAX_RUNNING, seen.ok
    # The load saturated: the relay shed, always saying when to come back.
    assert seen.shed > 0
    assert seen.shed_without_retry_after == 0
    wrong = [(w, c) for w, c, _ in seen.bad if not 400 <= c < 500]
    assert not wrong, wrong[:5]
    assert len(seen.bad) >= 20
    assert max(bad_times) < 2.0, sorted(bad_times)[-5:]
    assert stack.wait_stable(timeout=60) == primary


def quarantined_refusals(stack: Stack) -> float:
    """sglang_ha_relay_refused_total{reason="quarantined"}, all endpoints."""
    metrics = httpx.get(f"http://{stack.ip('gateway')}:8002/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sglang_ha_relay_refused_total{") and 'reason="quarantined"' in line
    )


def test_a_query_of_death_costs_only_itself(stack: Stack) -> None:
    """Under load from clients that never retry (streams and whole answers), one request
    holding the crash marker: it alone is quarantined, every other request is served,
    each node crashes at most once and never both at the same time."""
    stack.wait_stable()
    logs_before = {n: len(stack.ha_log(n)) for n in NODES.values()}
    unhealthy_before = {n: stack.ha_log(n).count("ENGINE_UNHEALTHY") for n in NODES.values()}
    relay_log_before = stack.ha_log("gateway").count("QUERY_QUARANTINED")
    refused_before = quarantined_refusals(stack)
    deadly = {"text": f"tell me {MARKER}", "sampling_params": {"max_new_tokens": 4}}
    quarantined = "quarantined"
    views: watch.Views = []

    async def run() -> tuple[httpx.Response, list[httpx.Response], float, list[str]]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as http:
            url = stack.gateway_url
            stop = time.monotonic() + 40
            outcomes: list[str] = []
            agents = asyncio.ensure_future(
                watch.watch_agents(stack, http, views, stop + 5, every=0.1)
            )

            async def everyone_else(client: int) -> None:
                n = 0
                while time.monotonic() < stop:
                    n += 1  # distinct prompts, as distinct users send
                    innocent = {
                        "text": f"hello {client}.{n}",
                        "sampling_params": {"max_new_tokens": 40 if client % 2 else 8},
                    }
                    try:
                        if client % 2:  # a stream: mid-generation when an engine dies
                            async with http.stream(
                                "POST", f"{url}/generate", json={**innocent, "stream": True}
                            ) as r:
                                body = (await r.aread()).decode()
                            ok = r.status_code == 200 and body.rstrip().endswith("[DONE]")
                            ok = ok and '"error"' not in body
                            outcomes.append("ok" if ok else f"stream {r.status_code} {body[-300:]}")
                        else:
                            r = await http.post(f"{url}/generate", json=innocent)
                            ok = r.status_code == 200
                            outcomes.append("ok" if ok else f"{r.status_code} {r.text[:300]}")
                    except httpx.HTTPError as exc:
                        outcomes.append(f"error {exc!r}")
                    await asyncio.sleep(0.2)

            others = [asyncio.ensure_future(everyone_else(c)) for c in range(4)]
            first = await http.post(f"{url}/generate", json=deadly)
            await asyncio.to_thread(stack.wait_stable, 60)
            started = time.monotonic()
            # Several times, on fresh connections: every relay worker must refuse it.
            again = []
            for _ in range(4):
                async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT) as fresh:
                    again.append(await fresh.post(f"{url}/generate", json=deadly))
            slowest = (time.monotonic() - started) / len(again)
            await asyncio.gather(*others)
            await agents
            return first, again, slowest, outcomes

    first, again, per_try, outcomes = asyncio.run(run())
    ok = outcomes.count("ok")
    print(
        f"query of death: {first.status_code}, then {[r.status_code for r in again]}"
        f" in {per_try:.3f}s each; others: {len(outcomes)} requests, {ok} ok"
    )
    for r in (first, *again):
        assert r.status_code == 503, r.text
        assert quarantined in r.json()["error"]["message"]
    assert per_try < 1.0
    crashes = {
        n: stack.ha_log(n).count("ENGINE_UNHEALTHY") - unhealthy_before[n] for n in NODES.values()
    }
    assert all(c <= 1 for c in crashes.values()), crashes
    assert sum(crashes.values()) >= 1, crashes
    # Never both engines down: in the agents' own status, sampled every 0.1 s, and in
    # their ENGINE_UNHEALTHY / ENGINE_HEALTHY events over the whole run.
    both_down = [v for _, v in views if all(v[n][2] != "healthy" for n in NODES)]
    assert not both_down, both_down[:3]
    assert len(views) > 100, len(views)
    spans = [watch.engine_down_spans(stack.ha_log(n)[logs_before[n] :]) for n in NODES.values()]
    assert not watch.overlapping(*spans), spans
    assert [o for o in outcomes if o != "ok"] == [], "everyone else was served"
    assert ok > 50, ok
    assert stack.ha_log("gateway").count("QUERY_QUARANTINED") == relay_log_before + 1
    metrics = httpx.get(f"http://{stack.ip('gateway')}:8002/metrics", timeout=5).text
    assert "sglang_ha_relay_quarantined_total 1.0" in metrics
    # Refused as quarantined: the culprit's four tries, nothing else.
    assert quarantined_refusals(stack) - refused_before == len(again)


def test_the_standby_hung_then_the_primary_killed_quarantines_nothing(stack: Stack) -> None:
    """Two unrelated faults are no query of death: the standby's engine hangs, 3 s later
    the primary's engine is killed, under load from clients that never retry."""
    primary = stack.wait_stable()
    standby = next(n for n in NODES if n != primary)
    relay_log_before = stack.ha_log("gateway").count("QUERY_QUARANTINED")

    def engine_state(node: str) -> Any:
        return (stack.agent_status(node) or {}).get("engine", {}).get("state")

    try:
        with background_load(stack.gateway_url) as load:
            stack.sim_faults(standby, hang=True)
            wait_until(lambda: engine_state(standby) == "hung", 20, what="the standby judged hung")
            time.sleep(3)  # as the user did
            stack.signal_engine(primary, "KILL")
            wait_until(lambda: engine_state(primary) != "healthy", 20, what="the primary seen dead")
            stack.sim_faults(standby)  # the hang ends
            stack.wait_stable(60)
    finally:
        stack.sim_faults(standby)
    print(f"standby hung, primary killed: {load.summary()}")
    quarantined = [r.error for r in load.records if "quarantined" in (r.error or "")]
    assert not quarantined, quarantined[:3]
    assert stack.ha_log("gateway").count("QUERY_QUARANTINED") == relay_log_before


def test_an_engine_kill_and_a_container_kill_fail_nothing(stack: Stack) -> None:
    """With the query-of-death rule on (the crash marker armed on both engines), plain
    crashes are failovers as before: the primary's engine killed with SIGKILL, then the
    new primary's container killed, under load from clients that never retry: 0 failed
    requests, nothing quarantined."""
    first = stack.wait_stable()
    relay_log_before = stack.ha_log("gateway").count("QUERY_QUARANTINED")
    second = first
    try:
        with background_load(stack.gateway_url) as load:
            time.sleep(3.0)  # under way
            stack.signal_engine(first, "KILL")
            second = stack.wait_stable(60)
            time.sleep(3.0)
            stack.kill_container(second)
            other = next(n for n in NODES if n != second)
            wait_until(
                lambda: (stack.agent_status(other) or {}).get("role") == "primary",
                60,
                what="the other node primary",
            )
            time.sleep(3.0)
    finally:
        stack.start_container(second)
    stack.wait_stable(90)
    print(f"engine kill on {first}, then container kill on {second}: {load.summary()}")
    assert len(load.records) > 50, load.summary()
    assert not load.failed, load.summary()
    assert stack.ha_log("gateway").count("QUERY_QUARANTINED") == relay_log_before
