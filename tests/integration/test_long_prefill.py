"""One long forward on the primary is busy, not hung.

With chunked prefill off (SGLang's --chunked-prefill-size -1, or a model for which it
turns chunking off) a 20000-token prompt at 1000 tokens/s is one prefill forward of
20 s: decode waits behind it and no counter moves until it ends (the simulator follows
SGLang here: docs/simulator.md). The agent gives a silent engine the longest forward it
can run at its prefill rate, so this gives 0 role changes and the other clients'
streams, held for those 20 s, complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import load_watch as watch
from tests.support.stack import NODES, Stack, overlay_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERLAY = Path(__file__).with_name("long_prefill.compose.yaml")
PROMPT_TOKENS = 20000  # at 1 ms a token (the overlay): one 20 s forward
CLIENTS = 4
GENERATION = 200


@pytest.fixture(scope="module")
def long_prefill_stack() -> Iterator[Stack]:
    with overlay_stack(OVERLAY, "sglang-ha-longprefill") as s:
        yield s


async def streams(
    http: httpx.AsyncClient, url: str, done: list[int], failed: list[str], until: asyncio.Event
) -> None:
    body = {
        "text": "Tell a story.",
        "sampling_params": {"max_new_tokens": GENERATION, "ignore_eos": True},
        "stream": True,
    }
    while not until.is_set():
        try:
            async with http.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
                if r.status_code != 200:
                    failed.append(f"HTTP {r.status_code}")
                    continue
                if await watch.stream_completed(r, GENERATION, failed):
                    done.append(1)
        except httpx.HTTPError as exc:
            failed.append(f"{type(exc).__name__}: {exc}")


async def run(stack: Stack) -> tuple[Any, float, watch.Views, int, list[str]]:
    views: watch.Views = []
    done: list[int] = []
    failed: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=CLIENTS + 8)) as http:
        url = stack.gateway_url
        clients = [
            asyncio.ensure_future(streams(http, url, done, failed, stop)) for _ in range(CLIENTS)
        ]
        watcher = asyncio.ensure_future(
            watch.watch_agents(stack, http, views, time.monotonic() + 90)
        )
        await asyncio.sleep(3)  # the streams run, the agent has seen the prefill rate
        body = {
            # The simulator's tokenizer: two characters a token.
            "text": "p" * (2 * PROMPT_TOKENS),
            "sampling_params": {"max_new_tokens": 1},
        }
        started = time.monotonic()
        long = await http.post(f"{url}/generate", json=body, timeout=120)
        took = time.monotonic() - started
        await asyncio.sleep(5)  # and after it
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=120)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return long.json(), took, views, len(done), failed


def test_a_20s_forward_on_the_primary_causes_no_role_change(long_prefill_stack: Stack) -> None:
    stack = long_prefill_stack
    primary = stack.wait_stable()
    epochs = {n: (stack.agent_status(n) or {}).get("epoch") for n in NODES}
    logs_before = watch.ha_log_lengths(stack)

    answer, took, views, completed, failed = asyncio.run(run(stack))

    # It was one long forward: ~20 s before the answer, the prompt whole.
    assert answer["meta_info"]["prompt_tokens"] >= PROMPT_TOKENS, answer
    assert took >= 19.0, took
    changed = watch.role_changes(views, primary, epochs)
    assert not changed, changed[:5]
    assert not watch.moved_lines(stack, logs_before)
    # The other clients' streams waited behind the forward and completed.
    assert completed >= CLIENTS, (completed, failed[:5])
    assert not failed, failed[:5]
    assert stack.wait_stable(timeout=60) == primary
