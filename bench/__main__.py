"""`make bench`: what the HA path costs, and how failover compares with the baselines.

    python -m bench [--trials N] [--phases overhead,ours,warming,baselines] [--out DIR]

0. capacity:  our CPU stack; 64 and 128 streams of 128 tokens straight to the
              primary's engine, through Nginx alone, SGLang's router and our
              gateway (1 relay worker, and one per CPU): events/s, TTFT, ITL, CPU
              per event (bench/capacity.py).
1. overhead:  our CPU stack; the same load straight to the primary's engine, through
              an Nginx with the gateway's config, and through Nginx + relay.
2. ours:      the same stack; each fault N times under the failover harness's load.
   warming:   the same stack; TTFT of the first requests after a failover, with the
              relay's standby warming on and off (bench/warming.py).
3. baselines: the same engines behind the article's Nginx and SGLang's router
              (defaults, and 1 s health checks); each fault N times, all at once.
4. light-latency, relay-scaling: local processes, no Docker; the relay in front of a
              fixed-rate synthetic engine: added TTFT and ITL at 1-4 concurrent
              pairs, and events/s at saturation with 1 and 2 relay workers
              (bench/gateway_bars.py).
5. pool:      engines limited by their running slots (4 each, fixed decode time):
              requests/s of the pair, the 2-node pool and SGLang's router over the
              pool's engines; failed requests on kill -9 and freeze (bench/pool.py).

Writes bench/results/{capacity,overhead,failover,warming,gateway-bars,pool}.json (with the
machine's description), overhead-samples.json and failover-requests.json (raw), overhead.md,
failover.md, warming.md, summary.md and two plots. Every stack gets a unique project
name and is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import capacity, gateway_bars, overhead, pool, report, warming
from bench.capacity import CapacityConfig
from bench.failover import BENCH_FAULTS, Trial, run_baselines, run_ours
from bench.overhead import OverheadConfig
from bench.stacks import baselines, build_images, our_stack
from tests.failover import runner
from tests.failover.scenarios import FAULTS

PHASES = (
    "capacity",
    "overhead",
    "ours",
    "warming",
    "baselines",
    "light-latency",
    "relay-scaling",
    "pool",
)
BARS = {"light-latency", "relay-scaling"}
# The simulator's settings on every engine (its defaults: see docs/simulator.md).
ENGINE = "ITL 10 ms × (1 + 0.01 × (running − 1)), TTFT 20 ms + 0.2 ms per prompt token"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--trials", type=int, default=2, help="trials per fault and system")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--concurrency", type=int, default=8, help="failover load clients")
    parser.add_argument("--rounds", type=int, default=OverheadConfig.rounds)
    parser.add_argument("--duration", type=float, default=OverheadConfig.duration)
    parser.add_argument("--concurrencies", default="1,16,64")
    parser.add_argument("--capacity-rounds", type=int, default=CapacityConfig.rounds)
    parser.add_argument("--no-build", action="store_true", help="use the images as built")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := [p for p in phases if p not in PHASES]:
        parser.error(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    # Own image tags: a teammate's rebuild of the shared tags cannot swap an image
    # between our build and our stack's start.
    os.environ.setdefault("SGLANG_HA_VERSION", "bench")
    cfg = OverheadConfig(
        concurrencies=tuple(int(c) for c in args.concurrencies.split(",")),
        rounds=args.rounds,
        duration=args.duration,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"machine": report.machine(), "phase_seconds": {}}
    began = time.monotonic()

    def phase_done(name: str, since: float) -> None:
        meta["phase_seconds"][name] = round(time.monotonic() - since, 1)
        print(f"== {name}: {meta['phase_seconds'][name]} s", flush=True)

    if not args.no_build:
        t = time.monotonic()
        print("== building images", flush=True)
        build_images()
        phase_done("build", t)

    trials: list[Trial] = []
    if {"capacity", "overhead", "ours", "warming"} & set(phases):
        t = time.monotonic()
        with our_stack() as ours:
            phase_done("our stack up", t)
            if "capacity" in phases:
                t = time.monotonic()
                print(f"== capacity: {ours.capacity_urls()}", flush=True)
                workers, nginx_workers = ours.relay_workers(), ours.nginx_workers
                ccfg = CapacityConfig(rounds=args.capacity_rounds)
                rows, runs = capacity.run(ours.capacity_urls(), ccfg, ours.cpu_files())
                phase_done("capacity", t)
                report.write_json(
                    args.out / "capacity.json",
                    {
                        **meta,
                        "config": {
                            **ccfg.__dict__,
                            "engine": ENGINE,
                            "relay_workers": workers,
                            "nginx_workers": nginx_workers,
                        },
                        "targets": capacity.targets(rows, workers, nginx_workers),
                        "rows": [r.to_json() for r in rows],
                    },
                )
                (args.out / "capacity-samples.json").write_text(json.dumps(runs))
                (args.out / "capacity.md").write_text(
                    capacity.markdown(rows, ccfg, workers, nginx_workers, ENGINE)
                )
            if "overhead" in phases:
                t = time.monotonic()
                print(f"== path overhead: {ours.urls()}", flush=True)
                cells, runs = overhead.run(ours.urls(), cfg, ours.cpu_files())
                phase_done("overhead", t)
                _write_overhead(args.out, meta, cfg, cells, runs)
            if "ours" in phases:
                t = time.monotonic()
                print("== failover: sglang-ha", flush=True)
                trials += asyncio.run(run_ours(ours, args.trials, args.concurrency))
                phase_done("failover sglang-ha", t)
            if "warming" in phases:
                t = time.monotonic()
                print("== warm standby: TTFT after failover, warming on and off", flush=True)
                variants = warming.run(ours)
                phase_done("warm standby", t)
                report.write_json(
                    args.out / "warming.json",
                    {**meta, "variants": warming.to_json(variants)},
                )
                (args.out / "warming.md").write_text(warming.markdown(variants))
    if "baselines" in phases:
        t = time.monotonic()
        print("== failover: baselines", flush=True)
        with baselines() as base:
            trials += asyncio.run(run_baselines(base, args.trials, args.concurrency))
        phase_done("failover baselines", t)
    if BARS & set(phases):
        t = time.monotonic()
        print("== gateway bars: light-load latency, relay-worker scaling", flush=True)
        bcfg = gateway_bars.BarsConfig()
        bars = gateway_bars.run(bcfg, BARS & set(phases))
        phase_done("gateway bars", t)
        report.write_json(
            args.out / "gateway-bars.json", {**meta, **gateway_bars.to_json(bars, bcfg)}
        )
        (args.out / "gateway-bars.md").write_text(
            gateway_bars.markdown(bars, bcfg, _run_line(meta))
        )
    if trials:
        _write_failover(args.out, meta, trials, args)
    if "pool" in phases:
        t = time.monotonic()
        print("== pool: pair, pool and SGLang's router, slot-limited engines", flush=True)
        pcfg = pool.PoolConfig()
        result = pool.run(pcfg, args.trials)
        phase_done("pool", t)
        report.write_json(
            args.out / "pool.json",
            {**meta, "config": pcfg.__dict__, **result},
        )
        (args.out / "pool.md").write_text(pool.markdown(result, pcfg, args.trials))
    meta["total_seconds"] = round(time.monotonic() - began, 1)
    _write_summary(args.out, meta)
    print(f"== done in {meta['total_seconds']} s; see {args.out / 'summary.md'}", flush=True)
    return 0


def _write_overhead(
    out: Path,
    meta: dict[str, Any],
    cfg: OverheadConfig,
    cells: list[overhead.Cell],
    runs: list[dict[str, Any]],
) -> None:
    report.write_json(
        out / "overhead.json",
        {
            **meta,
            "config": {**cfg.__dict__, "engine": ENGINE},
            "targets": report.overhead_targets(cells),
            "cells": [c.to_json() for c in cells],
        },
    )
    (out / "overhead-samples.json").write_text(json.dumps(runs))
    (out / "overhead.md").write_text(report.overhead_markdown(cells, cfg, {"engine": ENGINE}))
    report.plot_overhead(cells, out / "overhead.png")


def _write_failover(
    out: Path, meta: dict[str, Any], trials: list[Trial], args: argparse.Namespace
) -> None:
    hold = FAULTS[BENCH_FAULTS[0]].hold
    report.write_json(
        out / "failover.json",
        {
            **meta,
            "config": {
                "trials": args.trials,
                "concurrency": args.concurrency,
                "warmup_s": runner.WARMUP,
                "hold_s": hold,
                "observe_after_heal_s": runner.OBSERVE_AFTER_HEAL,
                "engine": ENGINE,
                "sglang_router": os.environ.get("SGLANG_ROUTER_VERSION", "0.3.2"),
            },
            "trials": [t.to_json() for t in trials],
        },
    )
    (out / "failover-requests.json").write_text(
        json.dumps(
            [
                {
                    "system": t.system,
                    "fault": t.fault,
                    "trial": t.trial,
                    "records": t.result.records,
                    "probe_records": t.probe.records if t.probe else [],
                }
                for t in trials
            ]
        )
    )
    (out / "failover.md").write_text(
        report.failover_markdown(trials, hold, runner.OBSERVE_AFTER_HEAL, args.concurrency)
    )
    report.plot_failover(trials, out / "failover.png")


def _run_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return (
        f"Run of {m['date']}, commit {m.get('commit') or 'not recorded'}; {m['cpu']},"
        f" {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['platform']}, Docker {m['docker']},"
        " no GPU."
    )


def _write_summary(out: Path, meta: dict[str, Any]) -> None:
    """Every section from its own result file, each headed by its run's date and commit
    (a later `--phases` run replaces some sections and keeps the others)."""
    parts = ["# sglang-ha benchmark (`make bench`)", ""]
    parts.append(
        f"Last rewritten by the run of {meta['machine']['date']}; each section names the"
        f" run it comes from. Phase times of that run (s): {meta['phase_seconds']}."
    )
    for name, title, plot in (
        ("capacity", "Capacity: events/s and CPU per event", None),
        ("overhead", "Path overhead", "overhead.png"),
        ("failover", "Failover against the baselines", "failover.png"),
        ("warming", "Warm standby: TTFT after a failover", None),
        ("gateway-bars", "Gateway bars: light-load latency and relay-worker scaling", None),
        ("pool", "Pool against pair and SGLang's router (slot-limited engines)", None),
    ):
        md = out / f"{name}.md"
        if md.exists():
            parts += ["", f"## {title}", ""]
            data = out / f"{name}.json"
            if data.exists() and name != "gateway-bars":  # its .md carries its run line
                parts += [_run_line(json.loads(data.read_text())), ""]
            parts.append(md.read_text())
            if plot:
                parts.append(f"![{title}]({plot})")
    (out / "summary.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
