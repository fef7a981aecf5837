"""Contract tests: how the simulated engine ends, as SGLang 0.5.19 does (paths under
python/sglang/srt/), and the field names and routes of that version.

Each test names the SGLang file and function it mirrors; docs/simulator.md lists them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any, cast

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.sim.server import SIM_KEY, SimServer
from tests.support.sim import sim_process
from tests.unit.conftest import (
    SimClientFactory,
    sim_json_events,
    sim_metric,
    sim_read_sse,
    sim_wait_for,
)
from tests.unit.test_sim_api import fixed, start_stream

pytestmark = pytest.mark.timeout(60)


def server_of(client: TestClient) -> SimServer:
    app = cast(TestServer, client.server).app
    assert app is not None
    return app[SIM_KEY]


class Calls:
    def __init__(self) -> None:
        self.at: list[float] = []

    def __call__(self) -> None:
        self.at.append(time.monotonic())


async def test_sigterm_keeps_accepting_and_drains_with_no_deadline(
    sim_client_factory: SimClientFactory,
) -> None:
    """managers/tokenizer_manager.py `SignalHandler.sigterm_handler` (only sets
    `gracefully_exit`) and `TokenizerManager.sigterm_watchdog` (drains while
    `rid_to_state` holds requests, looking every 5 s); entrypoints/http_server.py
    `health_generate` (503 once `gracefully_exit`)."""
    client = await sim_client_factory(itl=0.01, sigterm_poll_interval=0.05)
    server = server_of(client)
    exits = Calls()
    server.termination.exit_now = exits
    running = await start_stream(client, "long", fixed(60))
    server.termination.sigterm_handler()
    assert (await client.get("/health")).status == 503
    # Still accepting: a new request after SIGTERM is served in full.
    late = await client.post("/generate", json={"text": "late", "sampling_params": fixed(5)})
    assert late.status == 200
    assert (await late.json())["meta_info"]["finish_reason"]["type"] == "length"
    assert exits.at == [], "exited with requests left"
    events = sim_json_events(await sim_read_sse(running))
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
    finished = time.monotonic()

    async def exited() -> bool:
        return bool(exits.at)

    await sim_wait_for(exited, timeout=5)
    assert exits.at[0] - finished < 1.0, "it leaves as soon as the last request is done"


async def test_sigterm_exits_at_once_when_the_last_health_check_failed(
    sim_client_factory: SimClientFactory,
) -> None:
    """managers/tokenizer_manager.py `sigterm_watchdog`: `server_status == UnHealthy`
    (set by a failed `health_generate`) means "Force exiting", requests or not."""
    client = await sim_client_factory(
        itl=0.01, sigterm_poll_interval=0.05, health_check_timeout=0.2, health_check_interval=0.05
    )
    server = server_of(client)
    exits = Calls()
    server.termination.exit_now = exits
    stuck = await start_stream(client, "stuck", fixed(500))
    await client.post("/pause_generation", json={"mode": "in_place"})
    assert (await client.get("/health")).status == 503  # nothing came out: UnHealthy
    server.termination.sigterm_handler()

    async def exited() -> bool:
        return bool(exits.at)

    await sim_wait_for(exited, timeout=2)
    assert server.termination.remaining(), "a request was still held"
    stuck.close()


async def test_a_real_process_drains_on_sigterm_and_exits_0() -> None:
    """The same through the process's own signal handling (ha_agent/sim/__main__.py):
    aiohttp's stop-at-once is replaced by SGLang's drain."""
    with sim_process("drain", SIM_SIGTERM_POLL_INTERVAL="0.1", SIM_ITL="0.02") as sim:
        assert sim.proc is not None
        async with httpx.AsyncClient(timeout=20) as http:
            body = {"text": "x", "stream": True, "sampling_params": fixed(100)}
            async with http.stream("POST", f"{sim.url}/generate", json=body) as stream:
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data:"):
                        break
                sim.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)  # past the handler and a poll: must still serve
                late = await http.post(
                    f"{sim.url}/generate", json={"text": "y", "sampling_params": fixed(3)}
                )
                assert late.status_code == 200, late.text
                assert (await http.get(f"{sim.url}/health")).status_code == 503
                rest = [line async for line in lines if line.startswith("data:")]
            assert rest[-1] == "data: [DONE]"
            assert '"length": 100' in rest[-2] or '"length":100' in rest[-2]
        assert sim.proc.wait(timeout=10) == 0


async def test_scheduler_watchdog_kills_a_hang_with_a_batch_in_flight(
    sim_client_factory: SimClientFactory,
) -> None:
    """utils/watchdog.py `WatchdogRaw._watchdog_once` (no forward for
    `watchdog_timeout` while active, 5 s, SIGQUIT to the parent) and
    managers/scheduler_components/invariant_checker.py `create_scheduler_watchdog`
    (active while `cur_batch_for_debug` is set)."""
    client = await sim_client_factory(itl=0.01, watchdog_timeout=0.3)
    server = server_of(client)
    kills = Calls()
    server.termination.kill_now = kills
    running = await start_stream(client, "x", fixed(500))
    hung_at = time.monotonic()
    await client.post("/sim/faults", json={"hang": True})

    async def killed() -> bool:
        return bool(kills.at)

    await sim_wait_for(killed, timeout=5)
    # timeout (+ up to one look of timeout/2), then the grace (min(5 s, timeout) here).
    assert 0.55 <= kills.at[0] - hung_at < 2.0
    running.close()


async def test_scheduler_watchdog_never_ends_a_hang_that_began_idle(
    sim_client_factory: SimClientFactory,
) -> None:
    """create_scheduler_watchdog: a scheduler stuck while idle forms no batch, so its
    watchdog is inactive and SGLang never ends that hang."""
    client = await sim_client_factory(itl=0.01, watchdog_timeout=0.2)
    server = server_of(client)
    kills = Calls()
    server.termination.kill_now = kills
    await client.post("/sim/faults", json={"hang": True})
    waiting = asyncio.ensure_future(
        client.post("/generate", json={"text": "x", "sampling_params": fixed(5)})
    )
    await asyncio.sleep(1.5)  # several watchdog looks and grace periods: none may fire
    assert kills.at == []
    waiting.cancel()


async def test_scheduler_watchdog_counts_forwards_not_output(
    sim_client_factory: SimClientFactory,
) -> None:
    """invariant_checker.py `create_scheduler_watchdog`: the counter is
    `scheduler.forward_ct` (bumped in `Scheduler.run_batch`), not output reaching the
    tokenizer; a stalled detokenizer while the batch keeps decoding is no hang to it."""
    client = await sim_client_factory(itl=0.01, watchdog_timeout=0.2)
    server = server_of(client)
    kills = Calls()
    server.termination.kill_now = kills
    running = await start_stream(client, "x", fixed(2000))
    await client.post("/sim/faults", json={"detok_stall": True})
    before = await sim_metric(client, "sglang:realtime_tokens_total", mode="decode")
    await asyncio.sleep(1.5)  # several watchdog looks and grace periods: none may fire
    after = await sim_metric(client, "sglang:realtime_tokens_total", mode="decode")
    assert after > before  # the scheduler kept forwarding the whole time
    assert kills.at == []
    running.close()


async def test_meta_info_field_names(sim_client_factory: SimClientFactory) -> None:
    """managers/tokenizer_manager.py `_handle_batch_output`: `num_retractions` and
    `reasoning_tokens` (there is no `total_retractions`)."""
    client = await sim_client_factory()
    resp = await client.post("/generate", json={"text": "x", "sampling_params": fixed(3)})
    meta: dict[str, Any] = (await resp.json())["meta_info"]
    assert meta["num_retractions"] == 0 and meta["reasoning_tokens"] == 0
    assert "total_retractions" not in meta
    for key in ("id", "finish_reason", "prompt_tokens", "weight_version", "completion_tokens"):
        assert key in meta
    assert "cached_tokens" in meta and "e2e_latency" in meta


async def test_server_info_status_is_the_scheduler_handshake(
    sim_client_factory: SimClientFactory,
) -> None:
    """entrypoints/http_server.py `server_info` merges `scheduler_info`, which is
    managers/scheduler.py `get_init_info`: `"status": "ready"`, also while the server is
    still starting (the tokenizer manager's Starting/Up is not in the answer)."""
    client = await sim_client_factory(startup_delay=5)
    assert (await client.get("/health")).status == 503  # still starting
    info = await (await client.get("/server_info")).json()
    assert info["status"] == "ready"


async def test_no_ready_route_in_the_pinned_version(sim_client_factory: SimClientFactory) -> None:
    """entrypoints/http_server.py: `GET /ready` is absent from 0.5.19 (0.5.23 adds it)."""
    client = await sim_client_factory()
    resp = await client.get("/ready")
    assert resp.status == 404 and await resp.json() == {"detail": "Not Found"}
