"""Overload through a failover: the load generator of the admission-by-wait
measurement (docs/benchmarks.md), in a process of its own.

`python -m bench.shedding load --url URL --out OUT.json [group options]` runs groups
of clients for `--duration` seconds and writes one record per request: when it was
sent (seconds after `t0`, a wall-clock time also in the file, so that a fault
injected by another process can be placed on the same axis), its status, the
seconds until the client had the status (a 429's latency) and until its first
token, whether a 200 stream ended with `[DONE]`, and the `Retry-After` it was told.
Two groups: the *heavy* clients (long generations) and the *light* ones (a side load
of short requests). A client either sends one request (`--heavy-once`: N concurrent
requests, the issue's 280) or requests back to back; a request refused with 429 is
retried `--retries` times (the OpenAI SDKs' default `max_retries`, 2), each after
what `retry-after-ms`, else `Retry-After`, says, as the SDKs do
(`_parse_retry_after_header` reads the milliseconds first in 3.63, `_calculate_retry_timeout`
takes the value when 0 < it <= 60 s in 1.x). Each try has the client timeout `--timeout`
(the issue's clients gave up at 17 s). With `--light-served N` the load stops early,
once N light requests sent at least `--light-served-after` s after t0 were served
whole; `--duration` is then the most it runs (a pool's survivor serves its side load
again only after an inherited backlog whose drain time the machine's speed sets).

The measurement quoted in docs/benchmarks.md is tests/integration/test_wait_shedding.py
run with `SGLANG_HA_SHEDDING_RESULT=bench/results/shedding.json`: it brings up the CPU
stack with 8 running slots per engine, runs this load through the gateway, kills the
primary's node (`docker kill`) and writes what the clients saw before and after.

Lean on purpose (aiohttp, events counted without parsing), as bench/loadgen.py, so
the client costs little on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

DONE = b"data: [DONE]\n\n"
RETRY_AFTER_MAX = 60  # what the OpenAI Python SDK 1.x honours (wait.py)


@dataclass
class Record:
    group: str
    sent: float  # s after t0
    status: int = 0  # 0: no answer (timeout, connection error)
    took: float = 0.0  # s until the status line and headers
    ttft: float | None = None  # s until the first event of a 200 stream
    end: float = 0.0  # s until the end (a 200 stream: its [DONE])
    done: bool = False  # a 200 stream ended with [DONE]
    retry_after: int | None = None
    retry_after_ms: int | None = None  # the `retry-after-ms` header, which the SDK prefers
    attempt: int = 0  # 0: the request's first try; n: its n-th retry after a 429
    error: str = ""


@dataclass(frozen=True)
class Group:
    name: str
    clients: int
    tokens: int
    once: bool


def _body(tokens: int) -> bytes:
    return json.dumps(
        {
            "text": "Tell a very long story.",
            "sampling_params": {"max_new_tokens": tokens, "ignore_eos": True},
            "stream": True,
        }
    ).encode()


async def _one(session: aiohttp.ClientSession, url: str, group: Group, t0: float) -> Record:
    sent = time.time()
    rec = Record(group.name, sent - t0)
    try:
        async with session.post(
            url + "/generate",
            data=_body(group.tokens),
            headers={"Content-Type": "application/json"},
        ) as resp:
            rec.status, rec.took = resp.status, time.time() - sent
            if resp.status != 200:
                await resp.read()
                value = resp.headers.get("Retry-After")
                rec.retry_after = int(value) if value and value.isdigit() else None
                ms = resp.headers.get("retry-after-ms")
                rec.retry_after_ms = int(ms) if ms and ms.isdigit() else None
            else:
                tail = b""
                async for chunk in resp.content.iter_any():
                    if rec.ttft is None and b"data:" in chunk:
                        rec.ttft = time.time() - sent
                    tail = (tail + chunk)[-32:]
                rec.done = tail.endswith(DONE)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    rec.end = time.time() - sent
    return rec


@dataclass(frozen=True)
class Enough:
    """Stop once `served` requests of `group` sent at least `sent_after` s after t0
    were served whole."""

    group: str
    served: int
    sent_after: float

    def counts(self, rec: Record) -> bool:
        return rec.group == self.group and rec.sent >= self.sent_after and rec.done


async def load(
    url: str,
    groups: list[Group],
    duration: float,
    timeout: float,
    retries: int = 2,
    enough: Enough | None = None,
) -> tuple[float, list[Record]]:
    records: list[Record] = []
    connector = aiohttp.TCPConnector(limit=0)
    t0 = time.time()
    until = time.monotonic() + duration
    counted = 0

    async def client(session: aiohttp.ClientSession, group: Group) -> None:
        nonlocal until, counted
        while time.monotonic() < until:
            for attempt in range(retries + 1):  # one request: the SDK's retries of a 429
                rec = await _one(session, url, group, t0)
                rec.attempt = attempt
                records.append(rec)
                if enough is not None and enough.counts(rec):
                    counted += 1
                    if counted >= enough.served:
                        until = min(until, time.monotonic())
                # As the SDK (`_parse_retry_after_header`): milliseconds first, then seconds.
                told = rec.retry_after_ms / 1000 if rec.retry_after_ms else rec.retry_after
                if rec.status != 429 or attempt == retries or time.monotonic() >= until:
                    break
                await asyncio.sleep(told if told and 0 < told <= RETRY_AFTER_MAX else 1.0)
            if group.once:
                return
            if rec.status not in (200, 429):
                await asyncio.sleep(1.0)  # a failure: not a tight loop

    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        await asyncio.gather(
            *(client(session, g) for g in groups for _ in range(g.clients)),
        )
    return t0, records


def summarize(records: list[Record], after: float = 0.0) -> dict[str, Any]:
    """What a client saw, per group, for requests sent after `after` (s after t0)."""
    out: dict[str, Any] = {}
    for group in sorted({r.group for r in records}):
        mine = [r for r in records if r.group == group and r.sent >= after]
        shed = sorted(r.took for r in mine if r.status == 429)
        served = [r for r in mine if r.status == 200 and r.done]
        ttfts = sorted(r.ttft for r in served if r.ttft is not None)
        failed = [r for r in mine if not (r.status == 429 or (r.status == 200 and r.done))]
        out[group] = {
            "sent": len(mine),
            "served": len(served),
            "shed": len(shed),
            "shed_without_retry_after": sum(
                1 for r in mine if r.status == 429 and not r.retry_after
            ),
            "failed": len(failed),
            "failures": sorted({r.error or f"HTTP {r.status}" for r in failed})[:5],
            "shed_latency_median_s": _q(shed, 0.5),
            "shed_latency_p99_s": _q(shed, 0.99),
            "shed_latency_max_s": shed[-1] if shed else None,
            "ttft_median_s": _q(ttfts, 0.5),
            "ttft_max_s": ttfts[-1] if ttfts else None,
        }
    return out


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 4)


def _groups(args: argparse.Namespace) -> list[Group]:
    groups = [Group("heavy", args.heavy, args.heavy_tokens, args.heavy_once)]
    if args.light:
        groups.append(Group("light", args.light, args.light_tokens, False))
    return groups


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True)
    p.add_argument("--heavy", type=int, default=280)
    p.add_argument("--heavy-tokens", type=int, default=2000)
    p.add_argument("--heavy-once", action="store_true", help="each heavy client sends once")
    p.add_argument("--light", type=int, default=16)
    p.add_argument("--light-tokens", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=17.0, help="client timeout, s")
    p.add_argument(
        "--retries", type=int, default=2, help="retries of a 429 (the OpenAI SDK's max_retries)"
    )
    p.add_argument(
        "--light-served",
        type=int,
        default=0,
        help="stop once this many light requests were served whole (0: run --duration)",
    )
    p.add_argument(
        "--light-served-after", type=float, default=0.0, help="count those sent after this, s"
    )


def load_command(url: str, out: Path, **options: object) -> list[str]:
    """The command line of `python -m bench.shedding load` that runs the clients in a
    process of their own: `heavy_once=True` is `--heavy-once`, `light_tokens=16` is
    `--light-tokens=16`; what they saw goes to `out`."""
    argv = [sys.executable, "-m", "bench.shedding", "load", f"--url={url}"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv.append(flag if value is True else f"{flag}={value}")
    return [*argv, f"--out={out}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shedding")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_load = sub.add_parser("load", help="run the load, write the records")
    _add_load_args(p_load)
    p_load.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    enough = (
        Enough("light", args.light_served, args.light_served_after) if args.light_served else None
    )
    t0, records = asyncio.run(
        load(args.url, _groups(args), args.duration, args.timeout, args.retries, enough)
    )
    args.out.write_text(json.dumps({"t0": t0, "records": [asdict(r) for r in records]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
