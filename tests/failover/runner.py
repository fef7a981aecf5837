"""Run one fault scenario under load and measure what a user would.

Times are seconds from the fault:
- detected:        the cluster noticed (the node's agent reports its engine
                   unhealthy or gives up the primary role, or the relay marks the
                   node failed);
- promoted:        the standby's agent reports itself primary;
- first_success:   the first request answered by the standby after the fault;
- recovered:       from here on, every request that starts succeeds undisturbed
                   (not failed, and not slower than the pre-fault p99 by more than
                   a margin);
- disruption_end:  the last disturbed request finished.

In a pool (HA_MODE=pool) every healthy node serves, so there is no standby to promote:
`promoted` stays empty, `first_success` is the first request a survivor answered after
the fault, and the struck node must come back into the relay's rotation healthy
(`rejoined_as_standby` then means "rejoined"). The struck node rotates over the trials.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.failover.load import Load, RequestRecord
from tests.failover.scenarios import Fault
from tests.support.stack import Stack

WARMUP = 4.0
OBSERVE_AFTER_HEAL = 6.0
REJOIN_TIMEOUT = 45.0


@dataclass
class Sample:
    t: float
    roles: dict[str, str]  # node -> role or "unreachable"
    engines: dict[str, str]
    relay_primary: str | None
    relay_failed: dict[str, bool]


@dataclass
class ScenarioResult:
    mode: str
    fault: str
    description: str
    trial: int
    primary_before: str
    fault_at: float
    healed_at: float
    detected: float | None
    promoted: float | None
    first_success: float | None
    recovered: float | None
    disruption_end: float | None
    target_recovery: float
    requests: int
    nonstream_failed: int
    stream_failed: int
    text_mismatches: int
    p50: float
    p99: float
    p99_during_fault: float
    migrations: int
    role_history: list[dict[str, Any]]
    rejoined_as_standby: bool
    primary_after: str | None
    # Streams the relay ended with its explicit retryable error (a stream that cannot
    # move exactly, gateway/stream/migration.py): by design, so not in stream_failed.
    stream_refused: int = 0
    # Tool streams (the request had tools) on the faulted primary, open at the fault or
    # started before it was detected: completed (so moved, or done just before the
    # fault took hold) and refused.
    tool_streams_moved: int = 0
    tool_streams_refused: int = 0
    errors: list[str] = field(default_factory=list)
    # The disturbed requests that started past the recovery target (the first 8): when
    # each started after the fault, its latency and longest gap, which node answered.
    late_disturbed: list[dict[str, Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, with_records: bool = True) -> dict[str, Any]:
        data = asdict(self)
        if not with_records:
            data.pop("records")
        return data


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    k = min(round(q * (len(values) - 1)), len(values) - 1)
    return values[k]


def _sample(stack: Stack, t: float) -> Sample:
    roles, engines = {}, {}
    for node in stack.nodes:
        status = stack.agent_status(node, timeout=0.3)
        roles[node] = status["role"] if status else "unreachable"
        engines[node] = status["engine"]["state"] if status else "unknown"
    relay = stack.relay_status() or {}
    failed = {n["name"]: bool(n["failed"]) for n in relay.get("nodes", [])}
    return Sample(t, roles, engines, relay.get("primary"), failed)


def relay_migrations(stack: Stack) -> int:
    import httpx

    try:
        text = httpx.get(f"http://{stack.ip('gateway')}:8002/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sglang_ha_relay_migrations_total{") and 'outcome="migrated"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def misses(result: ScenarioResult) -> list[str]:
    """The targets every failover scenario must meet that this one missed."""
    missed = {
        "load": result.requests <= 50,
        "failed non-stream": result.nonstream_failed != 0,
        "failed streams": result.stream_failed != 0,
        "text mismatches": result.text_mismatches != 0,
        "detected": result.detected is None,
        "promoted": result.mode == "pair" and result.promoted is None,
        "never recovered": result.recovered is None,
        "recovery time": result.recovered is not None and result.recovered > result.target_recovery,
        "rejoined": not result.rejoined_as_standby,
        "fault injection": any(e.startswith(("inject", "heal")) for e in result.errors),
    }
    return [name for name, miss in missed.items() if miss]


def assert_clean_failover(result: ScenarioResult) -> str:
    """The targets every failover scenario must meet; returns the summary it quotes."""
    summary = json.dumps(result.to_json(with_records=False), indent=1)
    missed = misses(result)
    assert not missed, f"missed {missed}: {summary}"
    return summary


def trial_with_one_retry(trial: Callable[[int], ScenarioResult]) -> ScenarioResult:
    """Trial 1, and trial 2 only when trial 1 missed nothing but its recovery time.

    Why: "recovered" is the start of the first request after the last disturbed one
    (slower than the pre-fault p99 by a margin), so one request slowed by the host
    sets it. On the shared 2-core CI machine that happened with every request served:
    nic-down's last slow request started 12.4 s after the fault, 4 s after the heal,
    and engine-500's at 7.3 s against 6 s (CI on 4ae9681,
    bench/results/ci-runs/2026-12-06-4ae9681-ci-run.log); both passed in the CI runs
    before and after. A lost request, a missed detection or promotion is never
    retried, and a recovery that is slow every time still fails."""
    first = trial(1)
    if misses(first) != ["recovery time"]:
        return first
    print(
        f"trial 1 of {first.fault} missed only its recovery time"
        f" ({first.recovered:.2f}s > {first.target_recovery:g}s), requests disturbed"
        f" past it: {first.late_disturbed}; running trial 2"
    )
    return trial(2)


async def strike(
    stack: Stack, fault: Fault, target: str, now: Callable[[], float]
) -> tuple[float, float, list[str]]:
    """The timeline under a running load: warm up, inject, hold, heal, observe.
    Returns when the fault came and was healed (on the load's clock) and what failed
    to inject or heal."""
    await asyncio.sleep(WARMUP)
    fault_at = now()
    errors: list[str] = []
    try:
        await asyncio.to_thread(fault.inject, stack, target)
    except Exception as exc:
        errors.append(f"inject failed: {exc}")
    await asyncio.sleep(fault.hold)
    healed_at = now()
    try:
        await asyncio.to_thread(fault.heal, stack, target)
    except Exception as exc:
        errors.append(f"heal failed: {exc}")
    await asyncio.sleep(OBSERVE_AFTER_HEAL)
    return fault_at, healed_at, errors


async def run_scenario(stack: Stack, fault: Fault, trial: int, load: Load) -> ScenarioResult:
    leader = await asyncio.to_thread(stack.wait_stable, 90.0)
    if stack.mode == "pool":
        # Every node serves: strike each in turn over the trials (the first, the lease
        # holder's). `standby` names the first survivor, for the pair's fields.
        order = [leader, *(n for n in stack.nodes if n != leader)]
        primary = order[(trial - 1) % len(order)]
    else:
        primary = leader
    standby = next(n for n in stack.nodes if n != primary)
    migrations_before = await asyncio.to_thread(relay_migrations, stack)
    load.records = []
    stop = asyncio.Event()
    samples: list[Sample] = []

    async def sampler() -> None:
        while not stop.is_set():
            samples.append(await asyncio.to_thread(_sample, stack, load.now()))
            await asyncio.sleep(0.05)

    load_task = asyncio.ensure_future(load.run(stop))
    sample_task = asyncio.ensure_future(sampler())
    fault_at, healed_at, errors = await strike(stack, fault, primary, load.now)
    stop.set()
    records = await load_task
    await sample_task

    # After the fault heals, the old primary must rejoin as a standby; in a pool, the
    # struck node must be healthy and back in the relay's rotation.
    rejoined = False
    deadline = time.monotonic() + REJOIN_TIMEOUT
    primary_after = None
    while time.monotonic() < deadline:
        old = await asyncio.to_thread(stack.agent_status, primary)
        primary_after = await asyncio.to_thread(stack.primary)
        if stack.mode == "pool":
            relay = await asyncio.to_thread(stack.relay_status) or {}
            routed = any(n["name"] == primary and n["can_serve"] for n in relay.get("nodes", []))
            # Serving again: past the agent's rejoin damping, not only healthy.
            if old and old["engine"]["state"] == "healthy" and old.get("serving") and routed:
                rejoined = True
                break
        elif old and old["role"] == "standby" and old["engine"]["state"] == "healthy":
            rejoined = primary_after == standby
            break
        await asyncio.sleep(0.5)

    result = summarise(
        fault, trial, primary, standby, fault_at, healed_at, records, samples, stack.mode
    )
    result.migrations = await asyncio.to_thread(relay_migrations, stack) - migrations_before
    result.rejoined_as_standby = rejoined
    result.primary_after = primary_after
    result.errors = errors + result.errors
    return result


def summarise(
    fault: Fault,
    trial: int,
    primary: str,
    standby: str,
    fault_at: float,
    healed_at: float,
    records: list[RequestRecord],
    samples: list[Sample],
    mode: str = "pair",
) -> ScenarioResult:
    before = [r for r in records if r.ok and r.end < fault_at]
    base_p99 = _percentile([r.latency for r in before], 0.99)
    base_gap = _percentile([r.max_gap or 0.0 for r in before if r.stream], 0.99)

    def disturbed(r: RequestRecord) -> bool:
        if not r.ok:
            return True
        if r.stream:
            return (r.max_gap or 0.0) > 2 * base_gap + 0.3
        return r.latency > 1.5 * base_p99 + 0.3

    affected = [r for r in records if r.end >= fault_at]
    bad = [r for r in affected if disturbed(r)]
    recovered: float | None = 0.0
    if bad:
        last_bad_start = max(r.start for r in bad)
        later = [r for r in affected if r.start > last_bad_start]
        recovered = (min(r.start for r in later) - fault_at) if later else None
    disruption_end = (max(r.end for r in bad) - fault_at) if bad else 0.0

    def first(pred: Any) -> float | None:
        for s in samples:
            if s.t >= fault_at and pred(s):
                return s.t - fault_at
        return None

    # The system's detection, not the harness's: an unreachable agent only counts
    # once the relay has marked the node failed.
    if mode == "pool":
        # Roles say nothing of who serves: the engine's state and the relay's view do.
        detected = first(
            lambda s: (
                (s.roles[primary] != "unreachable" and s.engines[primary] != "healthy")
                or s.relay_failed.get(primary, False)
            )
        )
        promoted = None
        ok_on_standby = [r.end for r in affected if r.ok and r.node not in (None, primary)]
    else:
        detected = first(
            lambda s: (
                (s.roles[primary] not in ("primary", "unreachable"))
                or (s.roles[primary] != "unreachable" and s.engines[primary] != "healthy")
                or s.relay_failed.get(primary, False)
                or s.relay_primary != primary
            )
        )
        promoted = first(lambda s: s.roles[standby] == "primary")
        ok_on_standby = [
            r.end for r in affected if r.ok and r.node == standby and r.end >= fault_at
        ]
    history: list[dict[str, Any]] = []
    last: dict[str, str] = {}
    for s in samples:
        for node, role in s.roles.items():
            if last.get(node) != role:
                history.append({"t": round(s.t - fault_at, 3), "node": node, "role": role})
                last[node] = role
    during = [r.latency for r in records if fault_at <= r.start <= healed_at]
    seen_at = fault_at + (detected or 0.0)
    open_tools = [
        r
        for r in records
        if r.stream and r.tools and r.node == primary and r.start < seen_at and r.end > fault_at
    ]
    return ScenarioResult(
        mode=mode,
        fault=fault.name,
        description=fault.description,
        trial=trial,
        primary_before=primary,
        fault_at=fault_at,
        healed_at=healed_at,
        detected=detected,
        promoted=promoted,
        first_success=(min(ok_on_standby) - fault_at) if ok_on_standby else None,
        recovered=recovered,
        disruption_end=disruption_end,
        target_recovery=fault.target_recovery,
        requests=len(records),
        nonstream_failed=sum(1 for r in records if not r.ok and not r.stream),
        stream_failed=sum(1 for r in records if not r.ok and r.stream and not r.refused),
        text_mismatches=sum(1 for r in records if r.ok and r.text_matches is False),
        p50=statistics.median([r.latency for r in records]) if records else 0.0,
        p99=_percentile([r.latency for r in records], 0.99),
        p99_during_fault=_percentile(during, 0.99),
        migrations=0,
        role_history=history,
        rejoined_as_standby=False,
        primary_after=None,
        errors=[r.error for r in records if r.error][:10],
        late_disturbed=[
            {
                "start": round(r.start - fault_at, 3),
                "latency": round(r.latency, 3),
                "max_gap": None if r.max_gap is None else round(r.max_gap, 3),
                "stream": r.stream,
                "node": r.node,
                "error": r.error,
            }
            for r in bad
            if r.start - fault_at > fault.target_recovery
        ][:8],
        records=[r.to_json() for r in records],
        stream_refused=sum(1 for r in records if r.refused),
        tool_streams_moved=sum(1 for r in open_tools if r.ok),
        tool_streams_refused=sum(1 for r in open_tools if r.refused),
    )
