"""Failover against the baselines: the same faults under the same load.

Our stack runs the failover harness's own scenario (tests/failover/runner.py:
warm-up, fault on the current primary, hold, heal, observe, rejoin). The baselines
have no agents or roles, so they get the same timeline here, with the fault always
on node-1 (the article's primary; one of the router's two workers), and all three
front-ends loaded at once: each sees the very same fault. Every front-end is
restarted before a trial so none starts it remembering the previous one.

What is compared comes from the harness's `summarise`: failed requests (streaming
and not), time until every new request succeeds undisturbed again, and p99
latency of the requests that started while the fault lasted.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from bench.stacks import BASELINE_FRONTENDS, Baselines, OurStack
from bench.stats import percentile
from tests.failover import runner
from tests.failover.load import Load, RequestRecord
from tests.failover.runner import ScenarioResult, run_scenario, summarise
from tests.failover.scenarios import FAULTS

# The five faults, by the harness's names.
BENCH_FAULTS = ("engine-kill", "container-kill", "container-pause", "nic-down", "engine-hang")
SYSTEMS = ("sglang-ha", *BASELINE_FRONTENDS)
BASELINE_NODE, BASELINE_OTHER = "sglang-01", "sglang-02"


class BenchLoad(Load):
    """The harness's load, hardened for front-ends that break streams: a stream cut
    mid-body surfaces as the transport's own error (httpx), not as an openai error,
    and must count as a failed request rather than end the worker."""

    async def _one(self, i: int, stream: bool) -> RequestRecord:
        start = self.now()
        try:
            return await super()._one(i, stream)
        except (httpx.HTTPError, openai.OpenAIError, ValueError, OSError) as exc:
            return RequestRecord(
                start, self.now(), stream, False, None, error=f"{type(exc).__name__}: {exc}"[:300]
            )


def in_flight_p99(records: list[dict[str, Any]], fault_at: float, healed_at: float) -> float | None:
    """p99 latency of the requests in flight at any time during the fault (started
    before it healed, ended after it began). The harness's p99_during_fault counts
    only requests that *started* during it: a front-end whose clients all hang from
    the first second on starts none, and would show nothing."""
    lat = [
        float(r["end"] - r["start"])
        for r in records
        if r["start"] <= healed_at and r["end"] >= fault_at
    ]
    return percentile(lat, 0.99)


@dataclass
class Trial:
    system: str
    fault: str
    trial: int
    result: ScenarioResult
    # The fault hit the engine that carried this system's traffic (see Baselines.reset).
    fault_on_serving_node: bool = True

    @property
    def recovered(self) -> float | None:
        """Seconds from the fault until 100 % success, never below 0 (the harness
        measures from the start of the first request after the last disturbed one,
        which may have started before the fault)."""
        r = self.result.recovered
        return None if r is None else max(0.0, r)

    @property
    def p99_in_flight(self) -> float | None:
        r = self.result
        return in_flight_p99(r.records, r.fault_at, r.healed_at)

    def to_json(self) -> dict[str, Any]:
        data = self.result.to_json(with_records=False)
        return {
            "system": self.system,
            **data,
            "recovered_clamped": self.recovered,
            "p99_in_flight_during_fault": self.p99_in_flight,
            "fault_on_serving_node": self.fault_on_serving_node,
        }


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _log(t: Trial) -> None:
    r = t.result
    print(
        f"  [{t.system} {t.fault} #{t.trial}] failed {r.nonstream_failed}/{r.stream_failed}"
        f" (non-stream/stream) of {r.requests}, 100 % success after {_s(t.recovered)} s,"
        f" p99 in flight during the fault {_s(t.p99_in_flight)} s"
        + ("" if t.fault_on_serving_node else " (fault missed the serving engine)"),
        flush=True,
    )


async def run_ours(ours: OurStack, trials: int, concurrency: int) -> list[Trial]:
    load = BenchLoad(ours.stack.gateway_url, concurrency=concurrency)
    out: list[Trial] = []
    try:
        await load.take_references()
        for n in range(1, trials + 1):
            for name in BENCH_FAULTS:
                result = await run_scenario(ours.stack, FAULTS[name], n, load)
                out.append(Trial("sglang-ha", name, n, result))
                _log(out[-1])
    finally:
        await load.close()
    return out


async def run_baselines(base: Baselines, trials: int, concurrency: int) -> list[Trial]:
    zero = time.monotonic()  # one clock for every load: one fault time for all
    loads = {
        f: BenchLoad(base.url(f), concurrency=concurrency, clock_zero=zero)
        for f in BASELINE_FRONTENDS
    }
    out: list[Trial] = []
    try:
        for load in loads.values():
            await load.take_references()
        for n in range(1, trials + 1):
            for name in BENCH_FAULTS:
                serving = await asyncio.to_thread(base.reset, BASELINE_NODE)
                results = await _baseline_trial(base, name, n, loads)
                for system, result in results.items():
                    out.append(Trial(system, name, n, result, serving[system] == BASELINE_NODE))
                    _log(out[-1])
    finally:
        for load in loads.values():
            await load.close()
    return out


async def _baseline_trial(
    base: Baselines, name: str, n: int, loads: dict[str, BenchLoad]
) -> dict[str, ScenarioResult]:
    fault = FAULTS[name]
    stop = asyncio.Event()
    for load in loads.values():
        load.records = []
    tasks = {f: asyncio.ensure_future(load.run(stop)) for f, load in loads.items()}
    clock = next(iter(loads.values()))
    await asyncio.sleep(runner.WARMUP)
    fault_at = clock.now()
    errors = []
    try:
        await asyncio.to_thread(fault.inject, base.stack, BASELINE_NODE)
    except Exception as exc:
        errors.append(f"inject failed: {exc}")
    await asyncio.sleep(fault.hold)
    healed_at = clock.now()
    try:
        await asyncio.to_thread(fault.heal, base.stack, BASELINE_NODE)
    except Exception as exc:
        errors.append(f"heal failed: {exc}")
    await asyncio.sleep(runner.OBSERVE_AFTER_HEAL)
    stop.set()
    results = {}
    for frontend, task in tasks.items():
        records = await task
        # No agents to sample: detection and promotion do not exist here.
        result = summarise(
            fault, n, BASELINE_NODE, BASELINE_OTHER, fault_at, healed_at, records, []
        )
        result.errors = errors + result.errors
        results[frontend] = result
    return results
