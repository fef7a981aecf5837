"""Stream migration on the real stack: with 32 concurrent streams, killing,
freezing or cutting the network of the primary mid-stream loses no stream, every
migrated stream reads exactly like an uninterrupted run (the deterministic
simulator makes that checkable), and counts its tokens as the engine did: the
original prompt, exactly the requested budget."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.failover.load import MAX_TOKENS, Load
from tests.failover.runner import run_scenario
from tests.failover.scenarios import FAULTS
from tests.support.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 32


@pytest.mark.parametrize("fault_name", ["engine-kill", "container-pause", "nic-down"])
def test_no_stream_is_lost_with_32_concurrent_streams(stack: Stack, fault_name: str) -> None:
    async def scenario():  # type: ignore[no-untyped-def]
        load = Load(stack.gateway_url, concurrency=STREAMS, stream_every=1)
        try:
            await load.take_references()
            return await run_scenario(stack, FAULTS[fault_name], trial=1, load=load)
        finally:
            await load.close()

    result = asyncio.run(scenario())
    summary = json.dumps(result.to_json(with_records=False), indent=1)
    streams = [r for r in result.records if r["stream"]]
    assert len(streams) >= 3 * STREAMS, summary
    assert result.stream_failed == 0, summary
    assert result.text_mismatches == 0, summary
    # Usage as the uninterrupted reference's: the original prompt's tokens and the
    # completion tokens of every segment summed, never more than max_tokens.
    answered = [r for r in streams if r["ok"]]
    assert answered and all(r["usage_matches"] is True for r in answered), [
        r for r in answered if r["usage_matches"] is not True
    ][:3]
    assert all(0 < r["completion_tokens"] <= MAX_TOKENS for r in answered)
    # Streams really were cut mid-way and continued elsewhere. How many the fault finds
    # on the engine varies: a busy load generator spends part of each loop reading
    # what the engine already sent (seen: 6 of the 32 on a loaded machine).
    assert result.migrations >= STREAMS // 8, summary
