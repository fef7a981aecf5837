"""The simulator decodes its running requests in one batch, as SGLang does: one
forward pass per step for every running request, that step's tokens sent on together
(scheduler_components/output_streamer.py OutputStreamer.stream_output). So streams that
started at different times get their tokens at the same instants, not each on its own clock;
proxies in front see SGLang's bursts, not an even trickle."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.unit.conftest import SimClientFactory

pytestmark = pytest.mark.timeout(30)

ITL = 0.15  # long against this machine's scheduling noise
STAGGER = 0.045  # about a third of a step between the starts


async def test_streams_started_apart_get_their_tokens_in_the_same_steps(
    sim_client_factory: SimClientFactory,
) -> None:
    client = await sim_client_factory(itl=ITL, ttft_base=0.005, concurrency_slowdown=0.0)

    async def stream(delay: float, tokens: int) -> list[float]:
        await asyncio.sleep(delay)
        body = {
            "text": "batching",
            "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True},
        }
        arrivals = []
        async with client.post("/generate", json=body) as resp:
            assert resp.status == 200
            while True:
                line = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
                if line.startswith(b"data: [DONE]"):
                    return arrivals
                arrivals.append(time.monotonic())

    first, second, third = await asyncio.gather(
        stream(0.0, 8), stream(STAGGER, 4), stream(2 * STAGGER, 4)
    )
    assert len(first) == 8 and len(second) == len(third) == 4
    # Each later stream's first event comes from its own prefill; every decode token
    # after it lands with one of the first stream's (the same step), not a third of
    # a step off as independent clocks would put it.
    for later in (second, third):
        for at in later[1:]:
            off = min(abs(at - t) for t in first)
            assert off < ITL / 5, f"a token {off * 1000:.0f} ms away from the batch's step"
