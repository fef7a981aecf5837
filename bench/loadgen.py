"""The path-overhead load generator: a separate process, bounded in time and count.

`python -m bench.loadgen PLAN.json OUT.json` runs every entry of the plan in order
and writes one record per request. It is deliberately lean (aiohttp + uvloop, no
per-event JSON parsing) so that on a 2-core machine the client costs the same on
every path and leaves the CPU to what is being measured.

A run is a closed loop: `concurrency` workers, each sending its next request as
soon as the previous one ends. Requests that start during `warmup` are sent (they
open the connections) but tagged, so statistics can leave them out; no request
starts after `warmup + duration`; every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from bench.cpu import CpuMeter
from bench.credentials import engine_headers_if_any

# Content deltas of the OpenAI chat stream, counted without parsing each event:
# SGLang (and the simulator) serialise compactly, every chunk's delta carries
# "content" ("" in the role chunk, absent from the finish chunk); see
# python/sglang/srt/entrypoints/openai/serving_chat.py. Counted on whole events only.
CONTENT_MARK = b'"content":"'
EMPTY_CONTENT = b'"content":""'


def count_tokens(events: bytes) -> int:
    """Content chunks with text in `events` (whole SSE events)."""
    return events.count(CONTENT_MARK) - events.count(EMPTY_CONTENT)


DONE_MARK = b"data: [DONE]"
PROMPTS = [
    "Explain leader leases in two sentences.",
    "Write a haiku about GPUs.",
    "What is a fencing token?",
    "List three causes of a failover.",
]


@dataclass
class RunSpec:
    """One closed-loop run against one URL."""

    name: str  # e.g. "relay/stream/c64/r1"
    path: str  # direct | nginx | relay
    url: str  # base URL, e.g. http://172.18.0.5:8000
    stream: bool
    concurrency: int
    duration: float
    # Every run says its own bounds, in count as well as in time (no silent default).
    max_requests: int
    timeout: float  # per request
    warmup: float = 1.0
    max_tokens: int = 32
    # Distinct conversations (each prompt opened by its own line), so that a router's
    # prefix affinity sees many prefixes, as from many users; 0: the few PROMPTS alone.
    conversations: int = 0


class PlanConfig(Protocol):
    """What a benchmark's config sets for each of its runs."""

    @property
    def concurrencies(self) -> tuple[int, ...]: ...
    @property
    def rounds(self) -> int: ...
    @property
    def duration(self) -> float: ...
    @property
    def warmup(self) -> float: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def timeout(self) -> float: ...


def rotating_plan(
    urls: dict[str, str],
    paths: Sequence[str],
    cfg: PlanConfig,
    *,
    stream: bool,
    name: str,
    max_requests: Callable[[int], int],
) -> list[RunSpec]:
    """Every run of each concurrency in `cfg`, in the order they are made: each round
    runs every path once, the order rotating each round, so that slow drift of a
    shared machine falls on every path alike. `name` is formatted with `path`, `c`
    (concurrency) and `r` (round, from 1); `max_requests(concurrency)` bounds a run's
    count as well as its time."""
    specs = []
    for c in cfg.concurrencies:
        for r in range(cfg.rounds):
            shift = r % len(paths)
            for path in [*paths[shift:], *paths[:shift]]:
                specs.append(
                    RunSpec(
                        name=name.format(path=path, c=c, r=r + 1),
                        path=path,
                        url=urls[path],
                        stream=stream,
                        concurrency=c,
                        duration=cfg.duration,
                        warmup=cfg.warmup,
                        max_tokens=cfg.max_tokens,
                        max_requests=max_requests(c),
                        timeout=cfg.timeout,
                    )
                )
    return specs


@dataclass
class Sample:
    """One request: times in seconds from the run's start."""

    start: float
    end: float
    ok: bool
    warm: bool  # started during warm-up: excluded from the statistics
    tokens: int = 0
    ttft: float | None = None  # first content token (streams only)
    last_token: float | None = None  # arrival of the last content token (streams only)
    error: str | None = None


@dataclass
class RunResult:
    spec: RunSpec
    window: tuple[float, float]  # measured interval, from the run's start
    samples: list[Sample] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # cores used, measured interval
    # Streams, by arrival time: content events inside the window (throughput), and
    # from the window's start to the run's end (the interval the CPU is read over).
    window_events: int = 0
    metered_events: int = 0
    metered_seconds: float = 0.0
    # Gaps between consecutive content events of a stream, inside the window (ms,
    # rounded to 0.1): events that arrive in one read count as gaps of 0.
    itl_ms: dict[float, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "window": list(self.window),
            "cpu": self.cpu,
            "window_events": self.window_events,
            "metered_events": self.metered_events,
            "metered_seconds": round(self.metered_seconds, 4),
            "itl_ms": sorted(self.itl_ms.items()),
            # Compact rows: [start, end, ok, warm, tokens, ttft, last_token, error]
            "samples": [
                [
                    round(s.start, 6),
                    round(s.end, 6),
                    s.ok,
                    s.warm,
                    s.tokens,
                    None if s.ttft is None else round(s.ttft, 6),
                    None if s.last_token is None else round(s.last_token, 6),
                    s.error,
                ]
                for s in self.samples
            ],
        }

    def note_events(self, found: int, now: float, previous: float | None) -> None:
        lo, hi = self.window
        if now < lo:
            return
        self.metered_events += found
        if now > hi:
            return
        self.window_events += found
        if previous is not None and previous >= lo:
            gap = round((now - previous) * 1000, 1)
            self.itl_ms[gap] = self.itl_ms.get(gap, 0) + 1
        if found > 1:
            self.itl_ms[0.0] = self.itl_ms.get(0.0, 0) + found - 1


def _prompt(i: int, spec: RunSpec) -> str:
    prompt = PROMPTS[i % len(PROMPTS)]
    if spec.conversations:
        return f"Conversation {i % spec.conversations}. {prompt}"
    return prompt


def body(i: int, spec: RunSpec) -> bytes:
    payload: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": _prompt(i, spec)}],
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        # Every request generates exactly max_tokens: equal work on every path.
        "ignore_eos": True,
        "stream": spec.stream,
    }
    return json.dumps(payload).encode()


async def _one(
    session: aiohttp.ClientSession,
    spec: RunSpec,
    i: int,
    zero: float,
    warm_until: float,
    result: RunResult | None = None,
) -> Sample:
    start = time.monotonic() - zero
    sample = Sample(start=start, end=start, ok=False, warm=start < warm_until)
    try:
        async with session.post(
            spec.url + "/v1/chat/completions",
            data=body(i, spec),
            headers={"Content-Type": "application/json"},
        ) as resp:
            if resp.status != 200:
                await resp.read()
                sample.error = f"HTTP {resp.status}"
            elif spec.stream:
                await _read_stream(resp, sample, zero, result)
            else:
                data = json.loads(await resp.read())
                sample.tokens = int(data["usage"]["completion_tokens"])
                sample.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
    sample.end = time.monotonic() - zero
    return sample


async def _read_stream(
    resp: aiohttp.ClientResponse, sample: Sample, zero: float, result: RunResult | None = None
) -> None:
    pending = b""  # an event not yet complete
    done = False
    async for chunk in resp.content.iter_any():
        now = time.monotonic() - zero
        view = pending + chunk if pending else chunk
        cut = view.rfind(b"\n\n") + 2
        pending = view[cut:]
        if not cut:
            continue
        found = count_tokens(view[:cut])
        if found:
            if result is not None:
                result.note_events(found, now, sample.last_token)
            if sample.ttft is None:
                sample.ttft = now - sample.start
            sample.tokens += found
            sample.last_token = now
        if view[:cut].endswith(DONE_MARK + b"\n\n"):
            done = True
    sample.ok = done
    if not done:
        sample.error = "stream ended without [DONE]"


async def run(spec: RunSpec, meter: CpuMeter | None = None) -> RunResult:
    connector = aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    zero = time.monotonic()
    stop_at = spec.warmup + spec.duration
    result = RunResult(spec, (spec.warmup, stop_at))
    issued = 0

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        nonlocal issued
        i = w
        while time.monotonic() - zero < stop_at and issued < spec.max_requests:
            issued += 1
            result.samples.append(await _one(session, spec, i, zero, spec.warmup, result))
            i += spec.concurrency

    if meter is not None:  # from the end of the warm-up to the last answer
        asyncio.get_running_loop().call_later(spec.warmup, meter.start)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers=engine_headers_if_any(),
        skip_auto_headers=("User-Agent",),
    ) as session:
        await asyncio.gather(*(worker(w, session) for w in range(spec.concurrency)))
    if meter is not None:
        result.cpu = meter.cores()
        result.metered_seconds = meter.elapsed()
    return result


async def run_plan(
    specs: list[RunSpec], pause: float, meter: CpuMeter | None = None
) -> list[RunResult]:
    results = []
    for spec in specs:
        results.append(await run(spec, meter))
        print(f"  {spec.name}: {len(results[-1].samples)} requests", flush=True)
        await asyncio.sleep(pause)  # let the last connections close before the next run
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("plan", type=Path, help="JSON list of RunSpec objects")
    parser.add_argument("out", type=Path)
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument(
        "--cpu", type=Path, help="JSON {name: cgroup CPU file}: CPU used by each, per run"
    )
    args = parser.parse_args(argv)
    specs = [RunSpec(**item) for item in json.loads(args.plan.read_text())]
    meter = CpuMeter(json.loads(args.cpu.read_text())) if args.cpu else None
    try:
        import uvloop

        results = uvloop.run(run_plan(specs, args.pause, meter))
    except ImportError:  # pragma: no cover - a dependency on Linux
        results = asyncio.run(run_plan(specs, args.pause, meter))
    args.out.write_text(json.dumps([r.to_json() for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
