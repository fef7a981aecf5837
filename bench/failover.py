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
import contextlib
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


class Probe:
    """Open-loop probe: a new request every `interval` seconds, whatever happened to
    the previous ones (streams and not, alternately). The closed-loop load cannot
    show when a front-end serves new requests again while all its clients are
    stuck in requests to a frozen engine; the probe can."""

    def __init__(self, load: BenchLoad, interval: float = 0.25, max_requests: int = 1000) -> None:
        self.load = load
        self.interval = interval
        self.max_requests = max_requests

    async def run(self, stop: asyncio.Event) -> list[RequestRecord]:
        tasks: list[asyncio.Future[RequestRecord]] = []
        while not stop.is_set() and len(tasks) < self.max_requests:
            i = len(tasks)
            tasks.append(asyncio.ensure_future(self.load._one(i, stream=i % 2 == 0)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
        return list(await asyncio.gather(*tasks))


@dataclass
class Trial:
    system: str
    fault: str
    trial: int
    result: ScenarioResult  # the closed-loop load, summarised by the harness
    probe: ScenarioResult | None = None  # the open-loop probe, same summary
    # The fault hit the engine that carried this system's traffic (see Baselines.reset).
    fault_on_serving_node: bool = True

    @property
    def recovered(self) -> float | None:
        """Seconds from the fault until 100 % success, never below 0 (the harness
        measures from the start of the first request after the last disturbed one,
        which may have started before the fault)."""
        return _clamp(self.result.recovered)

    @property
    def probe_recovered(self) -> float | None:
        return None if self.probe is None else _clamp(self.probe.recovered)

    @property
    def p99_in_flight(self) -> float | None:
        r = self.result
        return in_flight_p99(r.records, r.fault_at, r.healed_at)

    def to_json(self) -> dict[str, Any]:
        data = self.result.to_json(with_records=False)
        probe = self.probe
        return {
            "system": self.system,
            **data,
            "recovered_clamped": self.recovered,
            "p99_in_flight_during_fault": self.p99_in_flight,
            "fault_on_serving_node": self.fault_on_serving_node,
            "probe": None
            if probe is None
            else {
                "requests": probe.requests,
                "nonstream_failed": probe.nonstream_failed,
                "stream_failed": probe.stream_failed,
                "recovered_clamped": self.probe_recovered,
            },
        }


def _clamp(value: float | None) -> float | None:
    return None if value is None else max(0.0, value)


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _log(t: Trial) -> None:
    r = t.result
    print(
        f"  [{t.system} {t.fault} #{t.trial}] failed {r.nonstream_failed}/{r.stream_failed}"
        f" (non-stream/stream) of {r.requests}; 100 % success after {_s(t.recovered)} s"
        f" (new requests: {_s(t.probe_recovered)} s); p99 in flight during the fault"
        f" {_s(t.p99_in_flight)} s"
        + ("" if t.fault_on_serving_node else " (fault missed the serving engine)"),
        flush=True,
    )


async def run_ours(ours: OurStack, trials: int, concurrency: int) -> list[Trial]:
    load = BenchLoad(ours.stack.gateway_url, concurrency=concurrency)
    probe = Probe(BenchLoad(ours.stack.gateway_url, concurrency=1, clock_zero=load.zero))
    out: list[Trial] = []
    try:
        await load.take_references()
        for n in range(1, trials + 1):
            for name in BENCH_FAULTS:
                stop = asyncio.Event()
                probing = asyncio.ensure_future(probe.run(stop))
                try:
                    result = await run_scenario(ours.stack, FAULTS[name], n, load)
                finally:
                    stop.set()
                    probes = await probing
                out.append(Trial("sglang-ha", name, n, result, _summary(name, n, result, probes)))
                _log(out[-1])
    finally:
        await load.close()
        await probe.load.close()
    return out


def _summary(
    name: str, n: int, main: ScenarioResult, records: list[RequestRecord]
) -> ScenarioResult:
    """The harness's summary of other records over the same fault timeline."""
    return summarise(
        FAULTS[name],
        n,
        main.primary_before,
        BASELINE_OTHER,
        main.fault_at,
        main.healed_at,
        records,
        [],
    )


async def run_baselines(base: Baselines, trials: int, concurrency: int) -> list[Trial]:
    zero = time.monotonic()  # one clock for every load: one fault time for all
    loads = {
        f: BenchLoad(base.url(f), concurrency=concurrency, clock_zero=zero)
        for f in BASELINE_FRONTENDS
    }
    probes = {
        f: Probe(BenchLoad(base.url(f), concurrency=1, clock_zero=zero)) for f in BASELINE_FRONTENDS
    }
    out: list[Trial] = []
    try:
        for load in loads.values():
            await load.take_references()
        for n in range(1, trials + 1):
            for name in BENCH_FAULTS:
                serving = await asyncio.to_thread(base.reset, BASELINE_NODE)
                results = await _baseline_trial(base, name, n, loads, probes)
                for system, (result, probe) in results.items():
                    on_node = serving.get(system) == BASELINE_NODE
                    out.append(Trial(system, name, n, result, probe, on_node))
                    _log(out[-1])
    finally:
        for x in [*loads.values(), *(p.load for p in probes.values())]:
            await x.close()
    return out


async def _baseline_trial(
    base: Baselines,
    name: str,
    n: int,
    loads: dict[str, BenchLoad],
    probes: dict[str, Probe],
) -> dict[str, tuple[ScenarioResult, ScenarioResult]]:
    fault = FAULTS[name]
    stop = asyncio.Event()
    for load in loads.values():
        load.records = []
    tasks = {f: asyncio.ensure_future(load.run(stop)) for f, load in loads.items()}
    probing = {f: asyncio.ensure_future(p.run(stop)) for f, p in probes.items()}
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
        # No agents to sample: detection and promotion do not exist here.
        main = summarise(
            fault, n, BASELINE_NODE, BASELINE_OTHER, fault_at, healed_at, await task, []
        )
        main.errors = errors + main.errors
        probe = summarise(
            fault,
            n,
            BASELINE_NODE,
            BASELINE_OTHER,
            fault_at,
            healed_at,
            await probing[frontend],
            [],
        )
        results[frontend] = (main, probe)
    return results
