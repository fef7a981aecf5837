"""The agent's judgement of its engine, against the simulator speaking SGLang's API."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest

from ha_agent.config import EngineHealthSettings
from ha_agent.node.engine.client import EngineClient
from ha_agent.node.engine.monitor import EngineState, HealthMonitor
from tests.support.processes import free_port
from tests.support.sim import sim_in_process, sim_process


def settings(url: str, **overrides: float) -> EngineHealthSettings:
    values: dict[str, float | str | None] = {
        "engine_url": url,
        "scrape_interval": 0.1,
        "scrape_timeout": 0.5,
        "stall_timeout": 0.5,
        "canary_idle": 1.0,
        "canary_timeout": 0.5,
        "startup_grace": 5.0,
        "supervisor_socket": None,
    }
    values.update(overrides)
    return EngineHealthSettings(**values)  # type: ignore[arg-type]


async def tick_until(
    monitor: HealthMonitor, predicate: Callable[[HealthMonitor], bool], timeout: float
) -> float:
    """Tick like the agent does; return how long it took for predicate to hold."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        await monitor.tick()
        if predicate(monitor):
            return time.monotonic() - started
        await asyncio.sleep(monitor.s.scrape_interval)
    raise AssertionError(f"engine still {monitor.health.state.value}: {monitor.health.reason}")


def is_state(state: EngineState) -> Callable[[HealthMonitor], bool]:
    return lambda m: m.health.state is state


async def test_engine_becomes_healthy_after_a_canary() -> None:
    async with sim_in_process() as sim:
        monitor = HealthMonitor(settings(sim.url))
        assert monitor.health.state is EngineState.STARTING
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        assert "canary generated a token" in monitor.health.reason
        await monitor.client.close()


async def test_engine_that_never_listens_is_starting_then_dead() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    monitor = HealthMonitor(settings(url, startup_grace=0.5))
    await monitor.tick()
    assert monitor.health.state is EngineState.STARTING
    await tick_until(monitor, is_state(EngineState.DEAD), timeout=5)
    assert "not listening" in monitor.health.reason
    await monitor.client.close()


async def test_crashed_engine_is_dead() -> None:
    async with sim_in_process() as sim:
        monitor = HealthMonitor(settings(sim.url))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        await sim.stop()
        took = await tick_until(monitor, is_state(EngineState.DEAD), timeout=5)
        assert took < 1.0
        await monitor.client.close()


async def test_hang_with_health_200_is_detected_under_load() -> None:
    async with sim_in_process() as sim:
        monitor = HealthMonitor(settings(sim.url))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        async with httpx.AsyncClient(timeout=30) as client:
            load = asyncio.ensure_future(
                client.post(
                    f"{sim.url}/generate",
                    json={
                        "text": "hello",
                        "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True},
                    },
                )
            )
            await sim.faults(hang=True)
            took = await tick_until(monitor, is_state(EngineState.HUNG), timeout=10)
            # SGLang's own /health runs a generation and gives up only after its 20 s
            # timeout: long after the agent's verdict it still has not answered.
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"{sim.url}/health", timeout=1.5)
            load.cancel()
        # Stall (0.5 s) plus one canary timeout (0.5 s), give or take the ticks.
        assert took < 3.0, took
        assert "canary timed out" in monitor.health.reason
        await monitor.client.close()


async def test_timed_out_canaries_are_aborted_and_never_pile_up() -> None:
    async with sim_in_process() as sim:
        client = EngineClient(sim.url)
        in_flight = 0
        most = 0
        calls = 0
        original = client.canary

        async def counting_canary(timeout: float):  # type: ignore[no-untyped-def]
            nonlocal in_flight, most, calls
            calls += 1
            in_flight += 1
            most = max(most, in_flight)
            try:
                return await original(timeout)
            finally:
                in_flight -= 1

        client.canary = counting_canary  # type: ignore[method-assign]
        monitor = HealthMonitor(settings(sim.url), client=client)
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        await sim.faults(hang=True)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            await monitor.tick()
            await asyncio.sleep(0.1)
        assert monitor.health.state is EngineState.HUNG
        assert most == 1, "never more than one canary in flight"
        assert calls <= 6, f"{calls} canaries in 4 s: should back off on a sick engine"
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{sim.url}/metrics")).text
        aborted = [
            line
            for line in metrics.splitlines()
            if line.startswith("sglang:num_aborted_requests_total")
        ]
        assert aborted and float(aborted[0].split()[-1]) >= 1, "timed-out canaries are aborted"
        await client.close()


async def test_engine_answering_500s_is_unhealthy() -> None:
    async with sim_in_process() as sim:
        monitor = HealthMonitor(settings(sim.url))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        await sim.faults(error_rate=1.0)
        await tick_until(monitor, is_state(EngineState.HUNG), timeout=5)
        assert "HTTP 500" in monitor.health.reason
        await sim.clear_faults()
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=10)
        await monitor.client.close()


async def test_client_errors_never_make_the_engine_unhealthy() -> None:
    async with sim_in_process() as sim:
        monitor = HealthMonitor(settings(sim.url, canary_idle=0.2))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        states = set()
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(200):
                body = (
                    b"{not json"
                    if i % 2
                    else b'{"text": 5, "sampling_params": {"max_new_tokens": -1}}'
                )
                r = await client.post(f"{sim.url}/generate", content=body)
                assert 400 <= r.status_code < 500
                if i % 10 == 0:
                    await monitor.tick()
                    states.add(monitor.health.state)
        assert states == {EngineState.HEALTHY}
        await monitor.client.close()


async def test_frozen_engine_process_is_detected_and_recovers() -> None:
    with sim_process() as sim:
        assert sim.proc is not None
        monitor = HealthMonitor(settings(sim.url))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=10)
        os.kill(sim.proc.pid, signal.SIGSTOP)
        try:
            took = await tick_until(monitor, is_state(EngineState.HUNG), timeout=10)
            assert "unresponsive" in monitor.health.reason
            assert took < 3.0, took
        finally:
            os.kill(sim.proc.pid, signal.SIGCONT)
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=10)
        await monitor.client.close()
