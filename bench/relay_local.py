"""A developer's loop for the relay's per-event cost, without Docker.

    python -m bench.relay_local [--streams 64] [--seconds 6] [--workers 1] [--profile OUT]

Starts a redis-server, two simulator processes (ITL 10 ms) with their agents, and
the relay as its own process(es) (`sglang-ha-relay`, as in the gateway); then the
capacity load (bench.loadgen) straight to the primary's engine and through the
relay, one after the other, and prints events/s and the relay's CPU per event.
`--profile` records the relay under load with py-spy (`py-spy` on PATH or in
/tmp/pyspy). Numbers here are for iterating only; `make bench` is the measurement.
"""

# ruff: noqa: ASYNC220, ASYNC240  (a developer tool: blocking set-up calls are harmless here)
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from bench.cpu import (
    processes_context_switches,
    processes_cpu_seconds,
    processes_cpu_split,
    stat_fields,
)
from bench.loadgen import RunSpec
from tests.support.cluster import local_cluster
from tests.support.processes import free_port, redis_server

SIM = {"SIM_ITL": "0.01", "SIM_TTFT_BASE": "0.02", "SIM_PREFILL_PER_TOKEN": "0.0002"}


async def main_async(args: argparse.Namespace) -> None:
    with redis_server() as redis:
        async with local_cluster(redis, relay=False, sim_env=SIM) as cluster:
            primary = await cluster.wait_ready()
            port, admin = free_port(), free_port()
            env = {
                **os.environ,
                "HA_RELAY_HOST": "127.0.0.1",
                "HA_RELAY_PORT": str(port),
                "HA_RELAY_ADMIN_PORT": str(admin),
                "HA_RELAY_HOST_ADMIN": "127.0.0.1",
                "HA_RELAY_WORKERS": str(args.workers),
                "HA_NODES": ",".join(
                    f"{n.name}={n.engine_url}={n.api_url}" for n in cluster.nodes.values()
                ),
                "HA_CLUSTER": "local",
                "HA_REDIS_URL": redis.url,
                "HA_REDIS_PASSWORD": redis.password,
                "HA_HA_LOG": os.path.join(cluster.workdir, "relay.ha.log"),
                "HA_LOG_LEVEL": "WARNING",
            }
            metrics_dir = tempfile.mkdtemp(prefix="sglang-ha-relay-metrics-")
            env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "ha_agent.gateway"],
                    env={**env, "HA_RELAY_WORKER_INDEX": str(i)},
                )
                for i in range(args.workers)
            ]
            try:
                url = f"http://127.0.0.1:{port}"
                await _wait_healthy(f"http://127.0.0.1:{admin}/health", 20.0)
                pids = [p.pid for p in procs]
                sim = cluster.nodes[primary].sim
                assert sim is not None and sim.proc is not None
                args.sim_pid = sim.proc.pid
                targets = {"direct": cluster.nodes[primary].engine_url, "relay": url}
                for name in args.paths.split(","):
                    await _measure(name, targets[name], pids, args)
                if args.profile:
                    await _profile(url, pids, args)
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    proc.wait(timeout=10)
                shutil.rmtree(metrics_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    # None: reaped; Z (or X): exited, not yet reaped.
    return fields is not None and fields[0] not in ("Z", "X")


def require_alive(pids: list[int], run: str) -> None:
    """A relay process that exited during a run no longer counts its CPU the way a
    live one does (reaped, processes_cpu_split counts it as nothing): the run's CPU
    per event could read low, so the run is refused instead."""
    gone = [pid for pid in pids if not _alive(pid)]
    if gone:
        raise RuntimeError(
            f"relay process(es) {gone} exited during the {run} run: their CPU is not"
            " counted and the figures would be low; see the relay's log"
        )


async def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(url, timeout=1)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} not healthy after {timeout}s")
            await asyncio.sleep(0.2)


async def _measure(name: str, url: str, pids: list[int], args: argparse.Namespace) -> None:
    spec = RunSpec(
        name=name,
        path=name,
        url=url,
        stream=True,
        concurrency=args.streams,
        duration=args.seconds,
        warmup=1.0,
        max_tokens=args.tokens,
        max_requests=args.streams * 200,
        timeout=30.0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "plan.json").write_text(json.dumps([asdict(spec)]))
        split_before, t0 = processes_cpu_split(pids), time.monotonic()
        switches_before = processes_context_switches(pids)
        sim_before = processes_cpu_seconds([args.sim_pid])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.loadgen", f"{tmp}/plan.json", f"{tmp}/out.json"
        )
        await asyncio.wait_for(proc.wait(), args.seconds + 60)
        split_after, wall = processes_cpu_split(pids), time.monotonic() - t0
        require_alive(pids, name)
        switches_after = processes_context_switches(pids)
        user = split_after[0] - split_before[0]
        system = split_after[1] - split_before[1]
        cpu = user + system
        sim_cores = (processes_cpu_seconds([args.sim_pid]) - sim_before) / wall
        run = json.loads(Path(tmp, "out.json").read_text())[0]
    errors = [s[7] for s in run["samples"] if s[7]]
    if errors:
        print(f"{name}: {len(errors)} errors, e.g. {errors[0]}")
    lo, hi = run["window"]
    tokens = run["window_events"]
    rate = tokens / (hi - lo)
    gaps = sorted((float(k), n) for k, n in run["itl_ms"])
    total, seen, p99 = sum(n for _, n in gaps), 0, 0.0
    for gap, n in gaps:
        seen += n
        if seen >= 0.99 * total:
            p99 = gap
            break
    relay_cores = cpu / wall
    per_event = cpu / max(tokens, 1) * 1e6 if name != "direct" else 0.0
    # Wake-ups (voluntary switches: the loop slept, then had work) and preemptions of
    # the relay's processes per 100 events, over the whole run as the CPU is.
    wakes, preempted = (
        after - before for after, before in zip(switches_after, switches_before, strict=True)
    )
    per_100 = 100 / max(tokens, 1)
    print(
        f"{name:7s} {rate:8.0f} events/s  ITL p99 {p99:.0f} ms  relay {relay_cores:.2f} cores"
        f" (~{per_event:.0f} us/event, whole run incl. warm-up; {user / max(cpu, 1e-9):.0%} user,"
        f" {system / max(cpu, 1e-9):.0%} kernel), engine {sim_cores:.2f} cores,"
        f" relay wake-ups {wakes * per_100:.1f} and preemptions {preempted * per_100:.1f}"
        " per 100 events",
        flush=True,
    )


async def _profile(url: str, pids: list[int], args: argparse.Namespace) -> None:
    spy = shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy"
    env = {**os.environ, "PYTHONPATH": "/tmp/pyspy:" + os.environ.get("PYTHONPATH", "")}
    target = pids[-1]
    rec = subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(target),
            "-d",
            str(int(args.seconds)),
            "-r",
            os.environ.get("PYSPY_RATE", "200"),
            "-f",
            "raw",
            "-o",
            args.profile,
            "--nonblocking",
        ],
        env=env,
    )
    await _measure("relay", url, pids, args)
    rec.wait(timeout=args.seconds + 60)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_local", description=__doc__)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per stream")
    parser.add_argument("--paths", default="direct,relay")
    parser.add_argument("--profile", help="py-spy raw (collapsed) output file")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
