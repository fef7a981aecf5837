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
from ha_agent.dcs.base import EngineStatus
from ha_agent.node.engine.client import (
    CanaryResult,
    EngineClient,
    EngineSample,
    EngineTimeout,
    EngineUnreachable,
    ForwardLimits,
    parse_metrics,
)
from ha_agent.node.engine.monitor import EngineState, HealthMonitor
from ha_agent.node.engine.process import (
    ProcessActivity,
    ProcessState,
    ProcessWatch,
    read_activity,
)
from tests.support.fakes import FakeClock
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
        # The stall (0.5 s), then the silence outlasts one forward (4096 tokens at 4000
        # tokens/s) while the canary waits, give or take the ticks.
        assert took < 3.0, took
        assert "canary" in monitor.health.reason, monitor.health.reason
        await monitor.client.close()


def _prompt(tokens: int, max_new: int, first: int = 7) -> dict[str, object]:
    return {
        "input_ids": [first] + [5] * (tokens - 1),
        "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True},
    }


async def test_one_long_forward_on_the_simulator_is_busy_not_hung() -> None:
    # --chunked-prefill-size -1: a 3000-token prompt at 1 ms a token is one 3 s forward;
    # decode waits behind it and no counter moves until it ends.
    async with sim_in_process(prefill_per_token=0.001, chunked_prefill_size=-1) as sim:
        monitor = HealthMonitor(settings(sim.url, prefill_rate=500))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        async with httpx.AsyncClient(timeout=30) as client:
            other = asyncio.ensure_future(
                client.post(f"{sim.url}/generate", json=_prompt(10, 300, first=9))
            )
            await asyncio.sleep(0.5)
            long = asyncio.ensure_future(client.post(f"{sim.url}/generate", json=_prompt(3000, 1)))
            seen: set[EngineState] = set()
            while not long.done():
                await monitor.tick()
                seen.add(monitor.health.state)
                await asyncio.sleep(monitor.s.scrape_interval)
            assert (await long).status_code == 200
            assert (await other).status_code == 200  # the other client's request completed
        assert seen == {EngineState.HEALTHY}, monitor.health
        assert monitor.max_forward_tokens() == 32762  # read from /server_info
        await monitor.client.close()


async def test_detokenizer_stall_on_the_simulator_is_hung_within_6s() -> None:
    async with sim_in_process() as sim:
        monitor = HealthMonitor(settings(sim.url))
        await tick_until(monitor, is_state(EngineState.HEALTHY), timeout=5)
        async with httpx.AsyncClient(timeout=30) as client:
            load = asyncio.ensure_future(
                client.post(f"{sim.url}/generate", json=_prompt(10, 20000))
            )
            await tick_until(monitor, lambda m: m.health.running > 0, timeout=5)
            await sim.faults(detok_stall=True)
            took = await tick_until(monitor, is_state(EngineState.HUNG), timeout=10)
            load.cancel()
        assert took < 6.0, took
        assert "none delivered" in monitor.health.reason
        await monitor.client.close()


async def test_canary_refused_for_a_full_queue_is_overload() -> None:
    # --max-queued-requests 1: one running, one waiting, the canary is refused with 503.
    async with sim_in_process(max_running_requests=1, max_queued_requests=1) as sim:
        client = EngineClient(sim.url)
        async with httpx.AsyncClient(timeout=30) as http:
            running = asyncio.ensure_future(http.post(f"{sim.url}/generate", json=_prompt(5, 500)))
            await asyncio.sleep(0.2)
            waiting = asyncio.ensure_future(http.post(f"{sim.url}/generate", json=_prompt(5, 1)))
            await asyncio.sleep(0.2)
            result = await client.canary(1.0)
            await http.post(f"{sim.url}/abort_request", json={"abort_all": True})
            await asyncio.gather(running, waiting)
        assert result.overloaded and not result.ok, result
        await client.close()


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


# -- the judgement on SGLang's signals, on a fake clock -----------------------------------
#
# SGLang 0.5.19 moves `sglang:realtime_tokens_total` at the end of every decode iteration
# and prefill forward (chunk) (python/sglang/srt/managers/scheduler_components/
# metrics_reporter.py); the tokenizer manager counts each output it receives past the
# detokenizer (time-to-first-token and inter-token histograms) and each request when it
# finishes (python/sglang/srt/managers/tokenizer_manager.py collect_metrics). A prefill
# forward blocks decode and moves nothing until it ends. It tokenizes prompts in its
# HTTP process, whose /metrics then waits. These engines script exactly that.


class ScriptedSGLang:
    """EngineClient's interface over a scripted engine on a fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.running = 0.0
        self.queued = 0.0
        self.prefill_tokens = 0.0
        self.decode_tokens = 0.0
        self.later_tokens = 0.0  # delivered: the inter-token histogram's count
        self.generation_tokens = 0.0
        self.requests = 0.0
        self.tokens_per_tick = 0.0  # what the scheduler decodes per scrape interval
        self.prefill_per_tick = 0.0  # prompt tokens of prefill chunks ending per interval
        self.detok_stalled = False  # decoded tokens do not reach the tokenizer manager
        self.forward_until = 0.0  # a forward pass in flight: nothing moves until then
        self.limits: ForwardLimits | None = None  # what /server_info says
        self.overloaded = False  # the canary is refused: queue full
        self.deliver_every = 1  # scrape intervals between outputs reaching the tokenizer
        self._ticks = 0
        self._undelivered = 0.0
        self.metrics_stall = 0.0  # /metrics unanswered (HTTP process busy or frozen)
        self.gone = False  # nothing listens: the process died
        self.canary_wait = 0.05  # how long a canary waits before its token
        self.canaries = 0
        self.canary_prefill = 0.0  # realtime tokens a canary's own prefill adds
        self._moved = asyncio.Event()

    def produce(self) -> None:
        if self.clock() < self.forward_until:
            return
        self.decode_tokens += self.tokens_per_tick
        self.prefill_tokens += self.prefill_per_tick
        self._undelivered += self.tokens_per_tick
        self._ticks += 1
        if not self.detok_stalled and self._ticks % self.deliver_every == 0:
            self.later_tokens += self._undelivered
            self._undelivered = 0

    def long_forward(self, prompt_tokens: float, seconds: float) -> None:
        """One prefill forward of ``prompt_tokens`` starts now and ends in ``seconds``."""
        self.forward_until = self.clock() + seconds
        self._forward_tokens = prompt_tokens

    def forward_ended(self) -> None:
        self.prefill_tokens += self._forward_tokens
        self.forward_until = 0.0

    def time_moved(self) -> None:
        """Wake a canary in flight: the fake clock went on."""
        self._moved.set()
        self._moved = asyncio.Event()

    async def scrape(self, timeout: float) -> EngineSample:
        if self.gone:
            raise EngineUnreachable("connection refused")
        if self.metrics_stall:
            self.clock.advance(timeout)  # the read waits out its timeout
            raise EngineTimeout(f"/metrics timed out after {timeout:g}s")
        return EngineSample(
            at=self.clock(),
            latency=0.01,
            running=self.running,
            queued=self.queued,
            prefill_tokens=self.prefill_tokens,
            decode_tokens=self.decode_tokens,
            later_tokens=self.later_tokens,
            generation_tokens=self.generation_tokens,
            requests=self.requests,
        )

    async def forward_limits(self, timeout: float) -> ForwardLimits | None:
        return self.limits

    async def canary(self, timeout: float) -> CanaryResult:
        self.canaries += 1
        if self.overloaded:
            return CanaryResult(False, 0.01, "canary refused: queue full", overloaded=True)
        self.prefill_tokens += self.canary_prefill
        started = self.clock()
        while self.clock() - started < min(self.canary_wait, timeout):
            await self._moved.wait()
        waited = self.clock() - started
        if waited >= timeout:
            return CanaryResult(False, waited, f"canary timed out after {timeout:g}s", True)
        return CanaryResult(True, waited, "canary generated a token")

    async def close(self) -> None:
        return None


class ScriptedProcess(ProcessWatch):
    """supervisord's view (running, pid) and /proc's (state letter, CPU time)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.letter = "S"
        self.supervisor_state = "RUNNING"
        self.exception = False  # the run that ended logged the engine's own exception
        self.final = False  # how it ended is read for good (ProcessState.final)
        self.exit_how = ""  # "terminated by SIGKILL (exit status 137)"
        self.cpu_share = 0.01  # of one core, from now on
        self._cpu = 0.0
        self._at = clock()

    async def read(self, timeout: float) -> ProcessState:
        if self.supervisor_state != "RUNNING":
            return ProcessState(
                "engine",
                self.supervisor_state,
                0,
                self.exit_how,
                exception=self.exception,
                final=self.final,
            )
        return ProcessState("engine", "RUNNING", 4242)

    def activity(self, pid: int) -> ProcessActivity | None:
        assert pid == 4242
        now = self.clock()
        self._cpu += (now - self._at) * self.cpu_share
        self._at = now
        return ProcessActivity(self.letter, self._cpu)

    def describe(self) -> str:
        return "scripted"


def scripted(
    process: bool = True, **overrides: float
) -> tuple[HealthMonitor, ScriptedSGLang, ScriptedProcess, FakeClock]:
    clock = FakeClock()
    engine = ScriptedSGLang(clock)
    proc = ScriptedProcess(clock)
    # The shipped timings (config.py), not the fast ones of the simulator tests above.
    values: dict[str, float | str | None] = {"supervisor_socket": None, **overrides}
    s = EngineHealthSettings(**values)  # type: ignore[arg-type]
    monitor = HealthMonitor(s, engine, proc if process else None, clock=clock)  # type: ignore[arg-type]
    return monitor, engine, proc, clock


async def run_for(
    monitor: HealthMonitor,
    engine: ScriptedSGLang,
    seconds: float,
    until: Callable[[HealthMonitor], bool] = lambda m: False,
) -> tuple[float, set[EngineState]]:
    """Tick every scrape_interval of fake time for `seconds` (or until `until`); the
    engine produces as scripted. Returns the fake time taken and the states seen."""
    clock = engine.clock
    started = clock()
    seen: set[EngineState] = set()
    while clock() - started < seconds:
        engine.produce()
        engine.time_moved()
        await monitor.tick()
        for _ in range(5):  # let a canary in flight see the clock
            await asyncio.sleep(0)
        seen.add(monitor.health.state)
        if until(monitor):
            break
        clock.advance(monitor.s.scrape_interval)
    return clock() - started, seen


async def confirmed(monitor: HealthMonitor, engine: ScriptedSGLang) -> None:
    await run_for(monitor, engine, 5, until=is_state(EngineState.HEALTHY))
    assert monitor.health.state is EngineState.HEALTHY, monitor.health


def saturated(engine: ScriptedSGLang) -> None:
    """More long generations than fit: a full batch, a queue, KV cache full. Tokens
    flow every iteration, none finishes, a canary waits far beyond its timeout."""
    engine.running, engine.queued = 256, 40
    engine.tokens_per_tick = 256 * 10
    engine.canary_wait = 30.0


def ordinary(engine: ScriptedSGLang) -> None:
    """A few streams decoding; a canary gets its token within a step or two."""
    engine.running, engine.queued = 8, 0
    engine.tokens_per_tick = 8 * 10
    engine.canary_wait = 0.05


async def test_parse_reads_sglang_progress_counters() -> None:
    # As SGLang 0.5.19 renders them: realtime tokens per mode and DP rank, finished
    # requests per is_streaming (python/sglang/srt/observability/metrics_collector.py).
    text = "\n".join(
        [
            "# TYPE sglang:realtime_tokens_total counter",
            'sglang:realtime_tokens_total{model_name="m",dp_rank="0",mode="decode"} 1200.0',
            'sglang:realtime_tokens_total{model_name="m",dp_rank="1",mode="decode"} 800.0',
            'sglang:realtime_tokens_total{model_name="m",dp_rank="0",mode="prefill_compute"} 50.0',
            "# TYPE sglang:generation_tokens_total counter",
            'sglang:generation_tokens_total{model_name="m",is_streaming="true"} 7.0',
            "# TYPE sglang:num_requests_total counter",
            'sglang:num_requests_total{model_name="m",is_streaming="false"} 3.0',
            "# TYPE sglang:num_running_reqs gauge",
            'sglang:num_running_reqs{model_name="m",dp_rank="0"} 4.0',
            'sglang:num_running_reqs{model_name="m",dp_rank="1"} 2.0',
            "# TYPE sglang:num_queue_reqs gauge",
            'sglang:num_queue_reqs{model_name="m",dp_rank="0"} 1.0',
        ]
    )
    sample = parse_metrics(text, at=1.0, latency=0.01)
    assert sample.realtime_tokens == 2050
    assert (sample.prefill_tokens, sample.decode_tokens) == (50, 2000)
    assert sample.delivered == 7 + 3
    assert (sample.running, sample.queued, sample.busy) == (6, 1, True)


async def test_parse_reads_what_the_tokenizer_manager_received() -> None:
    # Histograms count tokens received past the detokenizer: the first of each request
    # (time_to_first_token) and every later one (inter_token_latency, count += tokens).
    text = "\n".join(
        [
            "# TYPE sglang:time_to_first_token_seconds histogram",
            'sglang:time_to_first_token_seconds_bucket{model_name="m",le="+Inf"} 4.0',
            'sglang:time_to_first_token_seconds_count{model_name="m",is_streaming="true"} 4.0',
            'sglang:time_to_first_token_seconds_sum{model_name="m",is_streaming="true"} 0.4',
            "# TYPE sglang:inter_token_latency_seconds histogram",
            'sglang:inter_token_latency_seconds_bucket{model_name="m",le="+Inf"} 96.0',
            'sglang:inter_token_latency_seconds_count{model_name="m"} 96.0',
            'sglang:inter_token_latency_seconds_sum{model_name="m"} 1.9',
        ]
    )
    sample = parse_metrics(text, at=1.0, latency=0.01)
    assert (sample.first_tokens, sample.later_tokens, sample.delivered) == (4, 96, 100)


async def test_saturated_engine_with_tokens_flowing_stays_healthy_without_canaries() -> None:
    monitor, engine, _, _ = scripted()
    await confirmed(monitor, engine)
    canaries = engine.canaries
    saturated(engine)
    _, seen = await run_for(monitor, engine, 60)
    assert seen == {EngineState.HEALTHY}, monitor.health
    # Realtime tokens prove progress: no canary queues up behind the full batch.
    assert engine.canaries == canaries


async def test_canary_behind_a_long_prefill_is_slowness_not_a_hang() -> None:
    monitor, engine, _, _ = scripted()
    await confirmed(monitor, engine)
    saturated(engine)
    # One prefill chunk longer than stall_timeout: nothing moves, a canary goes out
    # and waits behind the batch; then decoding resumes while it still waits.
    engine.tokens_per_tick = 0
    await run_for(monitor, engine, monitor.s.stall_timeout + 1.0)
    assert engine.canaries >= 2, "the stall sent a canary"
    engine.tokens_per_tick = 2560
    _, seen = await run_for(monitor, engine, 20)
    assert seen == {EngineState.HEALTHY}, monitor.health
    assert monitor.recent_success_rate(least=1) is not None


async def test_tokens_stop_with_requests_present_is_hung_within_bound() -> None:
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(4096, 32762)  # the simulator's defaults
    await confirmed(monitor, engine)
    saturated(engine)
    await run_for(monitor, engine, 10)
    engine.tokens_per_tick = 0  # the scheduler hangs; gauges keep their last values
    took, _ = await run_for(monitor, engine, 30, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG, monitor.health
    assert "canary unanswered" in monitor.health.reason, monitor.health.reason
    assert took <= monitor.s.hang_detection_time + monitor.s.scrape_interval, took
    assert took <= 2.0, took


async def test_hang_right_after_a_read_is_caught_within_1_5s_with_the_simulators_chunk() -> None:
    # The failover harness's case: ordinary load, small prompts (no rate proved above
    # the 4000 tokens/s floor), the simulator's 4096-token chunk. The worst phase: the
    # hang strikes just after one read, and the tokens delivered before it are seen by
    # the next, so the silence starts a whole interval late. Waiting out the canary's
    # timeout took 2.0 s here; judging the silence while it waits takes one forward's
    # allowance, leaving the harness's 2 s bar a margin for its own sampling.
    monitor, engine, _, clock = scripted()
    engine.limits = ForwardLimits(4096, 32762)
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 10)
    hang_at = clock() - monitor.s.scrape_interval  # just after the last read
    await run_for(monitor, engine, monitor.s.scrape_interval)  # sees the last tokens
    engine.tokens_per_tick = 0  # the scheduler hangs; no new request starts either
    engine.canary_wait = 3600
    await run_for(monitor, engine, 30, until=is_state(EngineState.HUNG))
    took = clock() - hang_at
    assert monitor.health.state is EngineState.HUNG, monitor.health
    assert took <= 1.5, took
    assert took <= monitor.s.hang_detection_time + monitor.s.scrape_interval, took


async def test_hang_under_ordinary_load_is_caught_within_2s() -> None:
    # An 80 GB-class GPU's chunk (8192) and prompts arriving all along: the counters
    # prove a prefill rate above the floor, so one forward cannot be long.
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(8192, 131066)
    await confirmed(monitor, engine)
    ordinary(engine)
    engine.prefill_per_tick = 4000  # prompts of a few thousand tokens every interval
    await run_for(monitor, engine, 10)
    assert monitor.prefill_rate() >= 8000
    engine.tokens_per_tick = engine.prefill_per_tick = 0  # the scheduler hangs
    engine.canary_wait = 3600
    took, _ = await run_for(monitor, engine, 30, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG, monitor.health
    assert took <= 2.0, took


async def test_engine_gone_idle_with_a_slow_canary_is_not_judged_before_its_timeout() -> None:
    # The last requests finished and were delivered; the running gauge drops a read
    # later (SGLang publishes it when the idle scheduler sees it stale): output looks
    # owed, a canary goes out, and a slow but healthy engine answers it in 0.6 s.
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(4096, 32762)
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    engine.tokens_per_tick = 0
    await run_for(monitor, engine, monitor.s.scrape_interval)
    engine.running = 0  # the stale gauge published
    engine.canary_wait = 0.6
    canaries = engine.canaries
    _, seen = await run_for(monitor, engine, 10)
    assert engine.canaries > canaries
    assert seen == {EngineState.HEALTHY}, monitor.health


async def test_canary_waiting_while_metrics_went_unanswered_busy_is_not_judged_early() -> None:
    # Requests present, a canary out, then /metrics unanswered for a read while the
    # process burns CPU (a big prompt being tokenized), and the first read after it
    # still shows nothing moved: busy, as when the canary times out then.
    # A read that times out in 0.3 s: the canary is still waiting when reads resume.
    monitor, engine, proc, _ = scripted(scrape_timeout=0.3)
    engine.limits = ForwardLimits(4096, 32762)
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    tokens, engine.tokens_per_tick = engine.tokens_per_tick, 0
    engine.canary_wait = 3600
    canaries = engine.canaries
    await run_for(monitor, engine, 5, until=lambda m: engine.canaries > canaries)
    engine.metrics_stall, proc.cpu_share = 1.0, 1.0
    await run_for(monitor, engine, monitor.s.scrape_interval)
    engine.metrics_stall, proc.cpu_share = 0.0, 0.01
    _, seen = await run_for(monitor, engine, monitor.s.scrape_interval)
    engine.tokens_per_tick = tokens
    _, later = await run_for(monitor, engine, 5)
    assert seen | later == {EngineState.HEALTHY}, monitor.health


async def test_one_forward_of_20s_is_busy_not_hung() -> None:
    # --chunked-prefill-size -1 and a 100k-token prompt: one prefill forward of 20 s
    # blocks decode and moves no counter until it ends (process_batch_result_prefill).
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(-1, 131066)
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    assert monitor.forward_allowance() > 20
    engine.long_forward(100_000, 20.0)
    engine.canary_wait = 30.0  # the canary waits behind the forward too
    _, seen = await run_for(monitor, engine, 20.0)
    assert seen == {EngineState.HEALTHY}, monitor.health
    engine.forward_ended()
    engine.canary_wait = 0.05
    _, after = await run_for(monitor, engine, 10)
    assert after == {EngineState.HEALTHY}, monitor.health
    # It learnt the rate the forward showed: later silences are judged by it.
    assert monitor.prefill_rate() >= 100_000 / 20.5


async def test_silence_longer_than_any_forward_is_hung() -> None:
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(-1, 32762)  # the simulator with chunking off
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    engine.long_forward(1.0, 3600)  # a forward that never ends: a hang in the GPU
    engine.canary_wait = 3600
    allowance = monitor.forward_allowance()
    took, _ = await run_for(monitor, engine, 60, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG, monitor.health
    bound = min(allowance, monitor.s.busy_unresponsive_limit)
    assert bound - 0.5 <= took <= bound + 2 * monitor.s.scrape_interval, (took, bound)


async def test_output_stall_is_hung_within_6s() -> None:
    # The detokenizer stops: the scheduler keeps decoding (realtime tokens rise), no
    # token reaches the tokenizer manager, so clients get nothing.
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(4096, 32762)
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    engine.detok_stalled = True
    engine.canary_wait = 3600  # its token is held too
    took, _ = await run_for(monitor, engine, 30, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG, monitor.health
    assert "none delivered" in monitor.health.reason
    assert took <= 6.0, took


async def test_output_stall_of_short_requests_is_hung_within_6s() -> None:
    # Short requests behind a stalled detokenizer: the scheduler finishes them all before
    # its decode counter is published again (per log interval), so few tokens look owed;
    # its running gauge falls to 0 while no client got anything (seen in a CI run).
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(4096, 32762)
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    engine.detok_stalled = True
    engine.canary_wait = 3600  # its token is held too
    engine.tokens_per_tick = 0  # nothing decoded is published before they finish
    engine.running = 0  # and the scheduler is idle: every request finished
    took, _ = await run_for(monitor, engine, 30, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG, monitor.health
    assert took <= 6.0 - 1.0, took  # well inside the bound, not the 5 s idle check


async def test_non_streaming_batch_delivered_every_50_tokens_is_not_an_output_stall() -> None:
    # Non-streaming requests reach the tokenizer manager every 50 tokens
    # (SGLANG_FORCE_STREAM_INTERVAL): a saturated batch of them decodes for seconds
    # between deliveries while a canary waits behind it.
    monitor, engine, _, _ = scripted()
    await confirmed(monitor, engine)
    saturated(engine)
    engine.tokens_per_tick = 256 * 5  # 256 requests, 20 iterations a second
    engine.deliver_every = 10  # 50 iterations: 2.5 s between outputs
    _, seen = await run_for(monitor, engine, 30)
    assert seen == {EngineState.HEALTHY}, monitor.health


async def test_prompts_in_chunks_are_busy_not_an_output_stall() -> None:
    # A long prompt in chunks: prefill forwards back to back, decode waits, nothing is
    # delivered for seconds; every chunk's end moves the prefill counter.
    monitor, engine, _, _ = scripted()
    await confirmed(monitor, engine)
    ordinary(engine)
    await run_for(monitor, engine, 5)
    engine.tokens_per_tick, engine.prefill_per_tick = 0, 4096
    engine.canary_wait = 30.0
    _, seen = await run_for(monitor, engine, 15)
    assert seen == {EngineState.HEALTHY}, monitor.health


async def test_queue_full_canary_is_overload_not_a_hang() -> None:
    # Prefill forwards back to back with --max-queued-requests reached: the canary is
    # refused at once with 503 "The request queue is full.".
    monitor, engine, _, _ = scripted()
    await confirmed(monitor, engine)
    saturated(engine)
    engine.tokens_per_tick, engine.prefill_per_tick = 0, 4096
    engine.overloaded = True
    sent = engine.canaries
    _, seen = await run_for(monitor, engine, 10)
    assert seen == {EngineState.HEALTHY}, monitor.health
    assert engine.canaries > sent  # it did ask, and was refused
    assert monitor.recent_success_rate(least=1) == 1.0  # a refusal is not a failure


async def test_a_canarys_own_prefill_is_not_progress() -> None:
    # A scheduler that still prefills what arrives but never decodes: the only
    # movement is the canary's own prompt token.
    monitor, engine, _, _ = scripted()
    engine.limits = ForwardLimits(4096, 32762)
    await confirmed(monitor, engine)
    saturated(engine)
    await run_for(monitor, engine, 5)
    engine.tokens_per_tick, engine.canary_prefill = 0, 1
    took, _ = await run_for(monitor, engine, 30, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG, monitor.health
    assert took <= monitor.s.hang_detection_time + monitor.s.scrape_interval, took


async def test_slow_metrics_of_a_busy_process_are_not_a_hang_within_the_bound() -> None:
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    # A big prompt being tokenized in the HTTP process: /metrics waits, a core is busy.
    engine.metrics_stall, proc.cpu_share = 1.0, 0.95
    _, seen = await run_for(monitor, engine, monitor.s.busy_unresponsive_limit - 2)
    assert seen == {EngineState.HEALTHY}, monitor.health
    # It ends: judged healthy throughout, and no canary was fired meanwhile.
    engine.metrics_stall, proc.cpu_share = 0.0, 0.01
    _, seen = await run_for(monitor, engine, 10)
    assert seen == {EngineState.HEALTHY}, monitor.health


async def test_busy_but_never_answering_is_hung_at_the_bound() -> None:
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    engine.metrics_stall, proc.cpu_share = 1.0, 1.0  # a spinning HTTP process
    took, _ = await run_for(monitor, engine, 60, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG
    assert "although busy" in monitor.health.reason
    limit = monitor.s.busy_unresponsive_limit
    assert limit <= took <= limit + monitor.s.scrape_timeout + monitor.s.scrape_interval


async def test_tokenizing_while_an_idle_canary_waits_is_not_a_hang() -> None:
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    # Idle until canary_idle sends its check; just then a big prompt arrives and
    # its tokenization holds the HTTP process (and the canary with it) for 6 s.
    sent = engine.canaries
    engine.canary_wait = 6.0
    took, _ = await run_for(monitor, engine, 10, until=lambda m: engine.canaries > sent)
    assert engine.canaries == sent + 1 and took <= monitor.s.canary_idle + 1, "idle canary out"
    engine.metrics_stall, proc.cpu_share = 1.0, 1.0
    _, seen = await run_for(monitor, engine, 6.0)
    engine.metrics_stall, proc.cpu_share, engine.canary_wait = 0.0, 0.01, 0.05
    _, after = await run_for(monitor, engine, 10)
    assert seen | after == {EngineState.HEALTHY}, monitor.health


async def test_stopped_process_is_hung_at_once() -> None:
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    proc.letter, proc.cpu_share, engine.metrics_stall = "T", 0.0, 1.0  # SIGSTOP
    took, _ = await run_for(monitor, engine, 10, until=is_state(EngineState.HUNG))
    assert monitor.health.state is EngineState.HUNG
    assert "frozen" in monitor.health.reason and "state T" in monitor.health.reason
    assert took <= monitor.s.scrape_interval, took
    proc.letter, proc.cpu_share, engine.metrics_stall = "S", 0.01, 0.0  # SIGCONT
    await run_for(monitor, engine, 5, until=is_state(EngineState.HEALTHY))
    assert monitor.health.state is EngineState.HEALTHY


async def test_engine_stopped_by_supervisord_is_dead_not_frozen() -> None:
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    proc.supervisor_state = "STOPPED"  # supervisorctl stop engine: no process at all
    await run_for(monitor, engine, 1)
    assert monitor.health.state is EngineState.DEAD, monitor.health


async def test_each_run_ended_by_the_engines_own_exception_is_counted_once() -> None:
    """What the relay's query-of-death rule reads: a kill is not counted, and a crash
    is counted once however many ticks see the engine down."""
    monitor, engine, proc, clock = scripted()
    await confirmed(monitor, engine)

    def crashes() -> int:
        return monitor.health.status(clock()).exceptions

    proc.supervisor_state = "EXITED"  # kill -9: no exception in its output
    await run_for(monitor, engine, 2)
    assert monitor.health.state is EngineState.DEAD and crashes() == 0
    proc.supervisor_state = "RUNNING"
    await confirmed(monitor, engine)
    proc.supervisor_state, proc.exception = "EXITED", True  # "Scheduler hit an exception"
    await run_for(monitor, engine, 2)
    assert monitor.health.state is EngineState.DEAD and crashes() == 1
    assert "own exception" in monitor.health.reason
    proc.supervisor_state, proc.exception = "RUNNING", False
    await confirmed(monitor, engine)
    assert crashes() == 1, "the count outlives the run"
    proc.supervisor_state, proc.exception = "BACKOFF", True
    await run_for(monitor, engine, 1)
    assert crashes() == 2


async def test_how_the_engine_died_is_told_once_even_when_the_probe_saw_it_first() -> None:
    """A sidecar's Docker read can lag the HTTP probe by a tick: the death is told
    at once ("not listening"), then how it ended, once, when the watch says it (in
    CI on 4ae9681 the HA log never said SIGKILL: the first reason stuck)."""
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    told: list[tuple[EngineState, EngineState, str]] = []
    monitor.on_change(lambda old, new: told.append((old.state, new.state, new.reason)))
    engine.gone = True  # killed: refused before Docker says the container exited
    await run_for(monitor, engine, 1)
    assert [(o, n) for o, n, _ in told] == [(EngineState.HEALTHY, EngineState.DEAD)]
    assert "not listening" in told[0][2]
    proc.supervisor_state, proc.exit_how = "EXITED", "terminated by SIGKILL (exit status 137)"
    await run_for(monitor, engine, 1)
    proc.supervisor_state = "BACKOFF"  # restarting: the same death, nothing new to tell
    await run_for(monitor, engine, 1)
    assert len(told) == 2, told
    assert told[1][:2] == (EngineState.DEAD, EngineState.DEAD)
    assert "terminated by SIGKILL (exit status 137)" in told[1][2]
    # Served again, then killed with the watch first: one change, already explained.
    proc.supervisor_state, engine.gone = "RUNNING", False
    await confirmed(monitor, engine)
    del told[:]
    proc.supervisor_state, engine.gone = "EXITED", True
    await run_for(monitor, engine, 1)
    assert [(o, n) for o, n, _ in told] == [(EngineState.HEALTHY, EngineState.DEAD)]
    assert "SIGKILL" in told[0][2]


async def test_the_status_says_when_how_the_engine_died_is_known_for_good() -> None:
    """`exit_known` (what lets the relay re-send a kill's requests without its grace)
    only while down, and only once the process watch says its reading is final."""
    monitor, engine, proc, clock = scripted()
    await confirmed(monitor, engine)

    def known() -> bool:
        return monitor.health.status(clock()).exit_known

    assert not known()
    proc.supervisor_state = "EXITED"
    await run_for(monitor, engine, 1)
    assert monitor.health.state is EngineState.DEAD and not known(), "not read for good yet"
    proc.final = True
    await run_for(monitor, engine, 1)
    assert known()
    assert EngineStatus.from_json(monitor.health.status(clock()).to_json()).exit_known
    proc.supervisor_state, proc.final = "RUNNING", False
    await confirmed(monitor, engine)
    assert not known(), "serving again: nothing to say"


async def test_unanswered_metrics_without_cpu_is_hung_quickly() -> None:
    monitor, engine, proc, _ = scripted()
    await confirmed(monitor, engine)
    engine.metrics_stall, proc.cpu_share = 1.0, 0.0  # deadlocked: asleep, no CPU
    took, _ = await run_for(monitor, engine, 10, until=is_state(EngineState.HUNG))
    assert "process not using CPU" in monitor.health.reason
    assert took <= monitor.s.frozen_detection_time, took


async def test_without_a_process_view_unanswered_metrics_fall_back_to_the_quick_rule() -> None:
    # Sidecar with the engine in a container of its own: /proc cannot show it.
    monitor, engine, _, _ = scripted(process=False)
    await confirmed(monitor, engine)
    engine.metrics_stall = 1.0
    took, _ = await run_for(monitor, engine, 10, until=is_state(EngineState.HUNG))
    assert "process out of sight" in monitor.health.reason
    assert took <= monitor.s.frozen_detection_time, took


def test_read_activity_of_a_real_process() -> None:
    own = read_activity(os.getpid())
    assert own is not None and not own.stopped and own.cpu_seconds > 0
    assert read_activity(2**22 + 7) is None  # beyond pid_max: no such process
