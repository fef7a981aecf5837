"""Pool against pair and SGLang's router, with the engines' running slots as the limit.

Two simulator engines that each run at most `slots` requests at once (SGLang's
--max-running-requests; the rest wait in the engine's queue) and decode at a fixed
`itl` per token (compose/bench-pool.yaml): a request holds a slot for the same time
whoever sent it, so requests/s measures how many of the slots a system keeps busy,
not this machine's CPU. Three systems over the same engine settings:

- pair:   our stack, HA_MODE=pair (the primary's engine serves, the standby's waits);
- pool:   our stack, HA_MODE=pool (scripts/stack-nodes.sh pool 2): every healthy node;
- router: SGLang's router (default, cache-aware policy) over the pool stack's two
          engines, beside the pool's gateway.

1. Throughput: closed-loop clients (`concurrency`, several times the slots of both
   engines) send non-streamed chat completions of `max_tokens` tokens, from
   `conversations` distinct conversations so that prefix affinity sees many users;
   the systems take turns, `rounds` times, rotating. Requests/s = requests answered
   200 inside the measured window / its length.
2. Faults: `kill -9` of an engine and a frozen node (docker pause), each `trials`
   times, under the failover harness's load (streams and not). The pair's fault hits
   its primary; in the pool stack the pool's gateway and the router are loaded at
   once and see the very same fault, on the engine that carries most of the router's
   traffic (its cache-aware policy pins each prompt to a worker: the load's prompts
   are sent through it once before the trial and the engines' request counters say
   where they went), so that the fault cannot miss the router. Failed requests come
   from the harness's own summary.

Writes pool.json (config, machine, every run and trial) and pool.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from testcontainers.compose import DockerCompose

from bench.credentials import engine_authorization
from bench.failover import BenchLoad
from bench.loadgen import rotating_plan
from bench.overhead import run_loadgen
from bench.stacks import FRONTEND_PORT, Compose, _our_services, _release_faults
from bench.stats import END, OK, WARM
from tests.failover import runner
from tests.failover.load import PROMPTS
from tests.failover.runner import ScenarioResult, summarise
from tests.failover.scenarios import FAULTS
from tests.support.stack import COMPOSE_DIR, ROOT, Stack, read_secrets

SYSTEMS = ("pair", "pool", "router")
POOL_FAULTS = ("engine-kill", "container-pause")


@dataclass(frozen=True)
class PoolConfig:
    slots: int = 4  # SIM_MAX_RUNNING_REQUESTS per engine
    itl: float = 0.02  # s per token, fixed
    max_tokens: int = 32
    concurrency: int = 24  # 3x the 8 slots of two engines: every slot can stay busy
    conversations: int = 64
    duration: float = 15.0
    warmup: float = 3.0
    rounds: int = 2
    timeout: float = 60.0
    fault_concurrency: int = 8  # harness load per system during a fault

    @property
    def concurrencies(self) -> tuple[int, ...]:
        return (self.concurrency,)

    @property
    def slot_bound(self) -> float:
        """Requests/s two engines' slots allow at most: each request holds a slot for
        about max_tokens x itl (plus a prefill forward, left out: an upper bound)."""
        return 2 * self.slots / (self.max_tokens * self.itl)


# -- the stacks ------------------------------------------------------------------------


@contextlib.contextmanager
def slot_stack(mode: str, cfg: PoolConfig) -> Iterator[Stack]:
    """Our CPU stack in `mode` with slot-limited engines; the pool's adds the router."""
    read_secrets()
    project = f"sglang-ha-bench-{mode}-{uuid.uuid4().hex[:8]}"
    files = ["compose.yaml", "compose.test.yaml", "bench-pool.yaml"]
    generated: list[Path] = []
    services = _our_services()
    profiles: tuple[str, ...] = ()
    if mode == "pool":
        script = ROOT / "scripts" / "stack-nodes.sh"
        subprocess.run([str(script), "pool", "2", "compose.yaml", project], check=True)
        generated = [
            COMPOSE_DIR / f"{project}.generated.yaml",
            COMPOSE_DIR / f"{project}.prometheus.generated.yml",
        ]
        files.append(generated[0].name)
        services.append("router-pool")
        profiles = ("bench-pool",)
    compose = Compose(
        project,
        tuple(files),
        env={"BENCH_SLOTS": str(cfg.slots), "BENCH_ITL": str(cfg.itl)},
        profiles=profiles,
    )
    try:
        compose.run("up", "-d", "--wait", "--wait-timeout", "300", *services, timeout=420)
        stack = Stack(project, DockerCompose(str(COMPOSE_DIR)), mode=mode)
        stack.wait_stable(120.0)
        yield stack
    finally:
        _release_faults(compose)
        compose.down()
        for path in generated:
            path.unlink(missing_ok=True)


def _urls(stack: Stack) -> dict[str, str]:
    urls = {stack.mode: f"http://{stack.ip('gateway')}:{FRONTEND_PORT}"}
    if stack.mode == "pool":
        urls["router"] = f"http://{stack.ip('router-pool')}:{FRONTEND_PORT}"
    return urls


# -- throughput ------------------------------------------------------------------------


def throughput(urls: dict[str, str], cfg: PoolConfig) -> list[dict[str, Any]]:
    """Every system's closed-loop runs, rotating; one row per run."""
    specs = [
        dataclasses.replace(s, conversations=cfg.conversations)
        for s in rotating_plan(
            urls,
            list(urls),
            cfg,
            stream=False,
            name="pool/{path}/c{c}/r{r}",
            max_requests=lambda c: c * 200,
        )
    ]
    per_run = cfg.warmup + cfg.duration + cfg.timeout
    runs = run_loadgen(specs, timeout=len(specs) * per_run + 60)
    return [run_row(run) for run in runs]


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """Requests/s of one run: answered (200) inside the window, over its length."""
    lo, hi = run["window"]
    rows = run["samples"]
    done = [r for r in rows if not r[WARM] and lo <= r[END] <= hi]
    ok = [r for r in done if r[OK]]
    errors: dict[str, int] = {}
    for r in rows:
        if not r[OK]:
            errors[str(r[-1])] = errors.get(str(r[-1]), 0) + 1
    return {
        "system": run["spec"]["path"],
        "name": run["spec"]["name"],
        "requests_per_s": round(len(ok) / (hi - lo), 3),
        "answered": len(ok),
        "failed": sum(1 for r in rows if not r[OK]),
        "errors": errors,
    }


def rates(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for row in rows:
        out.setdefault(row["system"], []).append(row["requests_per_s"])
    return out


# -- faults ----------------------------------------------------------------------------


def _load(url: str, concurrency: int, zero: float, key: str | None = None) -> BenchLoad:
    load = BenchLoad(url, concurrency=concurrency, clock_zero=zero)
    if key:  # the router forwards the client's key to the engines, which require it
        load.client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key=key, max_retries=0, timeout=60.0
        )
    return load


def _served(stack: Stack) -> dict[str, float]:
    """Requests each engine has counted (its /metrics needs no key)."""
    out = {}
    for node in stack.nodes:
        text = httpx.get(f"{stack.engine_url(node)}/metrics", timeout=2).text
        out[node] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sglang:num_requests_total")
        )
    return out


def router_split(stack: Stack, url: str, key: str) -> dict[str, int]:
    """Where the router sends the harness load's prompts: each once, streamed and not,
    one at a time, counted by the engines (nothing else runs meanwhile)."""
    before = _served(stack)
    headers = {"Authorization": f"Bearer {key}"}
    for i, prompt in enumerate(PROMPTS):
        for stream in (False, True):
            body = {
                "model": "default",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 2,
                "temperature": 0,
                "seed": i,
                "stream": stream,
            }
            httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    after = _served(stack)
    return {n: int(after[n] - before[n]) for n in stack.nodes}


async def fault_trials(stack: Stack, cfg: PoolConfig, trials: int) -> list[dict[str, Any]]:
    """Each fault `trials` times; every system of the stack under load at once."""
    zero = time.monotonic()
    key = engine_authorization().removeprefix("Bearer ")
    loads = {
        name: _load(url, cfg.fault_concurrency, zero, key if name == "router" else None)
        for name, url in _urls(stack).items()
    }
    out: list[dict[str, Any]] = []
    try:
        for load in loads.values():
            await load.take_references()
        for n in range(1, trials + 1):
            for name in POOL_FAULTS:
                leader = await asyncio.to_thread(stack.wait_stable, 120.0)
                target, split = leader, {}
                if "router" in loads:
                    url = _urls(stack)["router"]
                    split = await asyncio.to_thread(router_split, stack, url, key)
                    target = max(sorted(split), key=lambda node: split[node])
                results = await _trial(stack, name, n, target, loads)
                for system, result in results.items():
                    out.append({**_trial_row(system, result), "router_split": split})
                    r = out[-1]
                    print(
                        f"  [{system} {name} #{n} on {target}, router's probes {split}] failed"
                        f" {r['nonstream_failed']}/{r['stream_failed']} of {r['requests']},"
                        f" migrated streams {r['migrations']}",
                        flush=True,
                    )
    finally:
        for load in loads.values():
            await load.close()
    return out


async def _trial(
    stack: Stack, name: str, n: int, target: str, loads: dict[str, BenchLoad]
) -> dict[str, ScenarioResult]:
    """The harness's timeline (warm-up, fault, hold, heal, observe), every load at once."""
    fault = FAULTS[name]
    other = next(x for x in stack.nodes if x != target)
    stop = asyncio.Event()
    for load in loads.values():
        load.records = []
    migrated_before = await asyncio.to_thread(runner.relay_migrations, stack)
    tasks = {s: asyncio.ensure_future(load.run(stop)) for s, load in loads.items()}
    clock = next(iter(loads.values()))
    fault_at, healed_at, errors = await runner.strike(stack, fault, target, clock.now)
    stop.set()
    migrated = await asyncio.to_thread(runner.relay_migrations, stack) - migrated_before
    results = {}
    for system, task in tasks.items():
        mode = "pool" if system == "pool" else "pair"
        result = summarise(fault, n, target, other, fault_at, healed_at, await task, [], mode)
        result.errors = errors + result.errors
        # The relay's counter: the router moves no stream.
        result.migrations = migrated if system != "router" else 0
        results[system] = result
    return results


def _trial_row(system: str, r: ScenarioResult) -> dict[str, Any]:
    return {
        "system": system,
        "fault": r.fault,
        "trial": r.trial,
        "node": r.primary_before,
        "requests": r.requests,
        "nonstream_failed": r.nonstream_failed,
        "stream_failed": r.stream_failed,
        "failed": r.nonstream_failed + r.stream_failed,
        "migrations": r.migrations,
        "text_mismatches": r.text_mismatches,
        "recovered_s": r.recovered,
        "errors": r.errors[:5],
    }


# -- the phase -------------------------------------------------------------------------


def run(cfg: PoolConfig, trials: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []
    for mode in ("pair", "pool"):
        with slot_stack(mode, cfg) as stack:
            print(f"== pool phase: {mode} stack, throughput {list(_urls(stack))}", flush=True)
            runs += throughput(_urls(stack), cfg)
            print(f"== pool phase: {mode} stack, faults", flush=True)
            faults += asyncio.run(fault_trials(stack, cfg, trials))
    return {"runs": runs, "faults": faults, "summary": summary(runs, faults, cfg)}


def summary(
    runs: list[dict[str, Any]], faults: list[dict[str, Any]], cfg: PoolConfig
) -> dict[str, Any]:
    r = rates(runs)
    median = {s: statistics.median(v) for s, v in r.items() if v}
    failed = {
        s: {
            f: sum(x["failed"] for x in faults if x["system"] == s and x["fault"] == f)
            for f in POOL_FAULTS
        }
        for s in SYSTEMS
    }
    pool, pair, router = median.get("pool"), median.get("pair"), median.get("router")
    return {
        "requests_per_s": median,
        "slot_bound_per_s": round(cfg.slot_bound, 2),
        "pool_over_pair": round(pool / pair, 3) if pool and pair else None,
        "pool_over_router": round(pool / router, 3) if pool and router else None,
        "failed": failed,
        "targets": {
            "pool >= 1.8x pair": bool(pool and pair and pool >= 1.8 * pair),
            "pool >= router": bool(pool and router and pool >= router),
            "pool fails 0 on kill -9 and freeze": all(v == 0 for v in failed["pool"].values()),
        },
    }


def markdown(result: dict[str, Any], cfg: PoolConfig, trials: int) -> str:
    s = result["summary"]
    r = rates(result["runs"])
    lines = [
        f"Two simulator engines, {cfg.slots} running slots each, {cfg.itl * 1000:g} ms per"
        f" token fixed, {cfg.max_tokens}-token non-streamed chat completions from"
        f" {cfg.conversations} conversations, {cfg.concurrency} closed-loop clients;"
        f" {cfg.rounds} rounds of {cfg.duration:g} s per system, rotating. The slots bound"
        f" two engines to about {s['slot_bound_per_s']} requests/s.",
        "",
        "| system | requests/s (median, runs) | failed on kill -9 | failed on freeze |",
        "|---|---|---|---|",
    ]
    labels = {
        "pair": "sglang-ha pair",
        "pool": "sglang-ha pool (2 nodes)",
        "router": "SGLang router (cache-aware) over the pool's engines",
    }
    for system in SYSTEMS:
        values = r.get(system, [])
        rate = statistics.median(values) if values else None
        runs = ", ".join(f"{v:.2f}" for v in values)
        f = s["failed"][system]
        lines.append(
            f"| {labels[system]} | {'—' if rate is None else f'{rate:.2f}'} ({runs}) |"
            f" {f['engine-kill']} | {f['container-pause']} |"
        )
    ratio = s["pool_over_pair"]
    lines += [
        "",
        f"Pool over pair: {ratio if ratio is not None else '—'}x; pool over router:"
        f" {s['pool_over_router'] if s['pool_over_router'] is not None else '—'}x."
        f" Faults: {trials} trial(s) each under the failover harness's load"
        f" ({cfg.fault_concurrency} clients per system, streams and not); the pair's on"
        f" its primary, the pool's and the router's at once on the engine that carried"
        f" most of the router's probes of the load's prompts.",
        "",
        "Targets: "
        + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in s["targets"].items()),
    ]
    return "\n".join(lines) + "\n"
