"""Warm standby: TTFT of the first requests after a failover, with and without warming.

A new primary's prefix cache is cold unless the relay mirrored live requests to it
as prefill-only work while it was the standby (ha_agent/gateway/upstream/warming.py). The
simulator's cache model makes the difference measurable: TTFT grows with the
*uncached* prompt tokens. For each variant (warming on at the default rate, off):

1. both engines' caches are flushed and the gateway restarts with HA_WARM_RATE set;
2. steady load through the gateway: long shared prefixes ("documents") with short
   varying questions, as in retrieval or agent traffic; its TTFT is the baseline;
3. the primary's engine is killed (`kill -9`); once the relay routes to the standby,
   the next FIRST_N requests are measured;
4. the stack settles (the old primary back as standby) before the next variant.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import httpx

from bench.credentials import engine_headers
from bench.loadgen import count_tokens
from bench.stacks import OurStack
from bench.stats import percentile
from tests.support.stack import NODES

DOCS = 10  # distinct shared prefixes
DOC_WORDS = 900  # ≈ 1,500 simulator tokens each
QUESTIONS = ("Summarise it.", "List the key risks.", "Who is affected?", "What changed?")
CONCURRENCY = 2
STEADY_S = 15.0  # steady load; the last half is the baseline
FIRST_N = 50
MAX_TOKENS = 4
VARIANTS = (("warming on", None), ("warming off", "0"))


def document(i: int) -> str:
    rng = random.Random(i)
    words = [f"w{rng.randrange(5000)}" for _ in range(DOC_WORDS)]
    return f"Document {i}: " + " ".join(words)


def body(k: int) -> bytes:
    doc = k % DOCS
    question = QUESTIONS[(k // DOCS) % len(QUESTIONS)]
    return json.dumps(
        {
            "model": "default",
            "messages": [{"role": "user", "content": f"{document(doc)}\n\nQuestion: {question}"}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()


@dataclass
class Sample:
    start: float
    ttft: float | None
    ok: bool
    node: str | None


@dataclass
class Variant:
    name: str
    warm_rate: str  # as set in the environment ("" = the default)
    steady: list[Sample] = field(default_factory=list)
    after: list[Sample] = field(default_factory=list)
    mirrors: float = 0.0  # the relay's mirror counter during the steady phase

    def summary(self) -> dict[str, Any]:
        steady = [s.ttft for s in self.steady if s.ok and s.ttft is not None]
        after = [s.ttft for s in self.after if s.ok and s.ttft is not None]
        base = percentile(steady, 0.5)
        out: dict[str, Any] = {
            "variant": self.name,
            "steady_requests": len(steady),
            "steady_ttft_p50_ms": _ms(base),
            "after_requests": len(self.after),
            "after_failed": sum(not s.ok for s in self.after),
            "after_ttft_p50_ms": _ms(percentile(after, 0.5)),
            "after_ttft_mean_ms": _ms(sum(after) / len(after) if after else None),
            "after_ttft_p90_ms": _ms(percentile(after, 0.9)),
            "after_ttft_max_ms": _ms(max(after) if after else None),
            "relay_mirrors_steady": self.mirrors,
        }
        if base and after:
            out["after_mean_vs_steady_p50"] = round(sum(after) / len(after) / base, 2)
            # A request "paid a cold prefill" if it took over 3x the steady median.
            out["after_cold_requests"] = sum(t > 3 * base for t in after)
        return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def _one(session: aiohttp.ClientSession, url: str, k: int, zero: float) -> Sample:
    start = time.monotonic()
    ttft = None
    ok = False
    node = None
    try:
        async with session.post(
            url + "/v1/chat/completions",
            data=body(k),
            headers={"Content-Type": "application/json"},
        ) as resp:
            node = resp.headers.get("x-sglang-ha-node")
            if resp.status == 200:
                async for chunk in resp.content.iter_any():
                    if ttft is None and count_tokens(chunk) > 0:
                        ttft = time.monotonic() - start
                ok = ttft is not None
            else:
                await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        ok = False
    return Sample(start - zero, ttft, ok, node)


async def _load(url: str, first_k: int, until: float | None, count: int | None) -> list[Sample]:
    """Closed loop, CONCURRENCY workers; stops at `until` (monotonic) or after `count`."""
    samples: list[Sample] = []
    next_k = first_k
    zero = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_k
            while (until is None or time.monotonic() < until) and (
                count is None or next_k - first_k < count
            ):
                k = next_k
                next_k += 1
                samples.append(await _one(session, url, k, zero))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return samples


def _mirrors(ours: OurStack) -> float:
    """Mirrors the standby answered, from the relay's /metrics."""
    try:
        text = httpx.get(f"http://{ours.stack.ip('gateway')}:8002/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('sglang_ha_relay_warm_mirrors_total{outcome="ok"}')
    )


def _flush_caches(ours: OurStack) -> None:
    for service in NODES.values():
        url = f"http://{ours.stack.ip(service)}:30000/flush_cache"
        deadline = time.monotonic() + 20
        # Refused while requests run; SGLang's admin-optional level takes the API key.
        while httpx.post(url, headers=engine_headers(), timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service}: /flush_cache kept refusing")
            time.sleep(0.2)


def _wait_relay_primary(ours: OurStack, not_node: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        relay = ours.stack.relay_status()
        if relay and relay.get("primary") not in (None, not_node):
            return str(relay["primary"])
        time.sleep(0.05)
    raise RuntimeError(f"the relay did not move off {not_node} within {timeout}s")


def run(ours: OurStack) -> list[Variant]:
    out = []
    k = 0
    for name, rate in VARIANTS:
        variant = Variant(name, rate or "")
        env = {} if rate is None else {"HA_WARM_RATE": rate}
        ours.compose.env.update(env)
        if rate is None:
            ours.compose.env.pop("HA_WARM_RATE", None)
        ours.compose.run("up", "-d", "--no-deps", "--wait", "gateway", timeout=180)
        primary = ours.stack.wait_stable(120.0)
        _flush_caches(ours)
        url = f"http://{ours.stack.ip('gateway')}:8000"
        mirrors_before = _mirrors(ours)
        steady = asyncio.run(_load(url, k, time.monotonic() + STEADY_S, None))
        k += len(steady)
        variant.mirrors = _mirrors(ours) - mirrors_before
        half = STEADY_S / 2
        variant.steady = [s for s in steady if s.start >= half]
        ours.stack.signal_engine(primary, "KILL")
        _wait_relay_primary(ours, primary, 30.0)
        variant.after = asyncio.run(_load(url, k, None, FIRST_N))
        k += FIRST_N
        out.append(variant)
        print(f"  {name}: {json.dumps(variant.summary())}", flush=True)
        ours.stack.wait_stable(120.0)  # the old primary back, as standby
    ours.compose.env.pop("HA_WARM_RATE", None)
    ours.compose.run("up", "-d", "--no-deps", "--wait", "gateway", timeout=180)
    return out


def to_json(variants: list[Variant]) -> list[dict[str, Any]]:
    return [
        {
            "summary": v.summary(),
            "steady": [asdict(s) for s in v.steady],
            "after": [asdict(s) for s in v.after],
        }
        for v in variants
    ]


def markdown(variants: list[Variant]) -> str:
    lines = [
        "| variant | mirrors during steady load | steady TTFT p50 ms | first 50 after failover:"
        " TTFT p50 ms | mean ms | p90 ms | max ms | mean / steady p50 | cold prefills | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        s = v.summary()
        lines.append(
            f"| {v.name} | {s['relay_mirrors_steady']:.0f} | {s['steady_ttft_p50_ms']} |"
            f" {s['after_ttft_p50_ms']} | {s['after_ttft_mean_ms']} | {s['after_ttft_p90_ms']} |"
            f" {s['after_ttft_max_ms']} | {s.get('after_mean_vs_steady_p50', '—')} |"
            f" {s.get('after_cold_requests', '—')} | {s['after_failed']} |"
        )
    lines += [
        "",
        f"Load: {CONCURRENCY} concurrent streams through the gateway, {DOCS} shared prefixes"
        f" (≈1,500 tokens each) with short varying questions, {MAX_TOKENS} tokens each;"
        f" {STEADY_S:g} s steady (baseline: its last half), then `kill -9` of the primary's"
        f" engine, then the first {FIRST_N} requests routed to the new primary. Caches are"
        " flushed before each variant. A cold prefill = TTFT over 3 × the steady p50.",
    ]
    return "\n".join(lines) + "\n"
