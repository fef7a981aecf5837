"""A saturated primary is not a hung one.

On SGLang a long generation adds to `generation_tokens_total` only when it finishes,
a new request (the agent's canary too) waits while the batch is full, and a big
prompt is tokenized in the HTTP process, whose /metrics then waits. None of that may
look like a hang: 60 s with a queue the whole time, 2,000-token generations and
multi-second tokenizations give 0 role changes. The simulator behaves as SGLang here
(counters at finish, `realtime_tokens_total` per iteration, FIFO admission, prompts
tokenized on the request path); a real hang is caught in tests/integration/test_failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import load_watch as watch
from tests.support.stack import NODES, Stack, overlay_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERLAY = Path(__file__).with_name("saturation.compose.yaml")
MAX_RUNNING = 8  # as in the overlay
STREAMS = 3 * MAX_RUNNING  # two batches' worth always waiting
GENERATION = 2000
DURATION = 60.0
RAMP = 5.0  # until the first batch is admitted and the queue has formed
# About 40 MB of prompt: seconds of tokenizing, then refused as longer than the context.
BIG_PROMPT = "lorem ipsum dolor sit amet, " * 2_200_000
BIG_PROMPTS_AT = (20.0, 40.0)
BIG_PROMPT_TIMEOUT = 60.0
SCRAPE_TIMEOUT = BIG_PROMPT_TIMEOUT


@pytest.fixture(scope="module")
def saturable_stack() -> Iterator[Stack]:
    with overlay_stack(OVERLAY, "sglang-ha-saturation") as s:
        yield s


def metric(text: str, name: str) -> float | None:
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    ]
    return sum(values) if values else None


@dataclass
class Observed:
    queue: list[tuple[float, float | None]] = field(default_factory=list)  # (t, queued)
    views: watch.Views = field(default_factory=list)  # agents
    slow_metrics: list[float] = field(default_factory=list)  # /metrics answers > 1 s
    metrics_errors: list[str] = field(default_factory=list)  # scrapes that got no answer
    reconnects: int = 0  # scrapes sent again: the engine had closed the idle connection
    finished: int = 0
    failed: list[str] = field(default_factory=list)
    big_prompt_status: list[int] = field(default_factory=list)


async def generate(http: httpx.AsyncClient, url: str, seen: Observed, until: float) -> None:
    """One client: 2,000-token streams back to back until `until` (each bounded)."""
    body = {
        "text": "Tell a very long story.",
        "sampling_params": {"max_new_tokens": GENERATION, "ignore_eos": True},
        "stream": True,
    }
    while time.monotonic() < until:
        try:
            async with http.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
                if r.status_code != 200:
                    seen.failed.append(f"HTTP {r.status_code}")
                    continue
                if await watch.stream_completed(r, GENERATION, seen.failed):
                    seen.finished += 1
        except httpx.HTTPError as exc:
            seen.failed.append(f"{type(exc).__name__}: {exc}")


async def watch_queue(http: httpx.AsyncClient, url: str, seen: Observed, until: float) -> None:
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            # A scrape waits as long as a big prompt's tokenizing holds the HTTP process
            # (the big prompt's own bound): a held-up /metrics is what this test makes
            # happen, and the queue it then reports is still a sample.
            try:
                answer = await http.get(f"{url}/metrics", timeout=SCRAPE_TIMEOUT)
            except httpx.RemoteProtocolError:
                # The engine closed our idle keep-alive connection as the scrape went
                # out: a loop held past the keep-alive timeout (5 s) runs the idle
                # timer before it reads the waiting request, on uvicorn over uvloop
                # as in the simulator. Sent again on a new connection, as a client
                # does with a request the server never began.
                seen.reconnects += 1
                answer = await http.get(f"{url}/metrics", timeout=SCRAPE_TIMEOUT)
            queued = metric(answer.text, "sglang:num_queue_reqs")
        except httpx.HTTPError as exc:
            seen.metrics_errors.append(f"{time.monotonic() - started:.1f} s: {exc!r}")
            queued = None
        took = time.monotonic() - started
        if took > 1.0:
            seen.slow_metrics.append(took)
        seen.queue.append((started, queued))
        await asyncio.sleep(max(0.5 - took, 0.05))


async def big_prompts(
    http: httpx.AsyncClient, url: str, key: str, seen: Observed, t0: float
) -> None:
    """Prompts far beyond the context, straight at the engine (with its API key; the
    gateway refuses them before any engine sees them): seconds of tokenizing, then a
    400, as SGLang."""
    for at in BIG_PROMPTS_AT:
        await asyncio.sleep(max(t0 + at - time.monotonic(), 0))
        body = {"text": BIG_PROMPT, "sampling_params": {"max_new_tokens": 8}}
        auth = {"Authorization": f"Bearer {key}"}
        r = await http.post(f"{url}/generate", json=body, headers=auth, timeout=BIG_PROMPT_TIMEOUT)
        seen.big_prompt_status.append(r.status_code)


async def saturate(stack: Stack, primary: str) -> Observed:
    seen = Observed()
    limits = httpx.Limits(max_connections=STREAMS + 16)
    async with httpx.AsyncClient(limits=limits) as http:
        t0 = time.monotonic()
        until = t0 + DURATION
        clients = [
            asyncio.ensure_future(generate(http, stack.gateway_url, seen, until))
            for _ in range(STREAMS)
        ]
        engine = stack.engine_url(primary)
        watchers = [
            watch_queue(http, engine, seen, until),
            watch.watch_agents(stack, http, seen.views, until),
            big_prompts(http, engine, stack.secrets["HA_ENGINE_API_KEY"], seen, t0),
        ]
        try:
            await asyncio.wait_for(
                asyncio.gather(*watchers), timeout=DURATION + SCRAPE_TIMEOUT + 15
            )
        finally:
            # Streams still running at the end are cut: the load is bounded in time.
            for task in clients:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*clients, return_exceptions=True)
    return seen


def test_saturation_and_big_prompts_cause_no_role_change(saturable_stack: Stack) -> None:
    stack = saturable_stack
    primary = stack.wait_stable()
    epochs = {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES}
    logs_before = watch.ha_log_lengths(stack)

    seen = asyncio.run(saturate(stack, primary))

    t0 = seen.queue[0][0]
    # 0 role changes: the same primary, the same epoch, the engine healthy throughout.
    changed = watch.role_changes(seen.views, primary, epochs)
    assert not changed, changed[:5]
    moved = watch.moved_lines(stack, logs_before)
    assert not moved, moved
    # The load was what it claims: a queue on the primary at every sample after the
    # ramp, full-length generations finishing, and the big prompts refused after
    # seconds of tokenizing that held up /metrics (else nothing was tested).
    sampled = [(t - t0, q) for t, q in seen.queue if t - t0 >= RAMP]
    assert len(sampled) >= 40, sampled
    assert not seen.metrics_errors, seen.metrics_errors[:5]
    empty = [(round(t, 1), q) for t, q in sampled if not q]
    assert not empty, f"queue not > 0 at {empty[:10]} of {len(sampled)} samples"
    assert seen.finished >= MAX_RUNNING, (seen.finished, seen.failed[:5])
    assert not seen.failed, seen.failed[:5]
    assert seen.big_prompt_status == [400, 400], seen.big_prompt_status
    assert seen.slow_metrics and max(seen.slow_metrics) >= 2.0, seen.slow_metrics

    assert stack.wait_stable(timeout=60) == primary
    assert {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES} == epochs
