"""Statistics for the benchmark: percentiles, per-cell summaries, ratios to direct.

Pure functions over the load generator's sample rows, so they can be unit-tested
without containers. A sample row is
`[start, end, ok, warm, tokens, ttft, last_token, error]` (see bench/loadgen.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

START, END, OK, WARM, TOKENS, TTFT, LAST_TOKEN, ERROR = range(8)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 1]); None when there is nothing."""
    if not values:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    data = sorted(values)
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def request_itl(row: Sequence[Any]) -> float | None:
    """Mean inter-token latency of one stream: (last token - first token) / (n - 1)."""
    tokens, ttft, last = row[TOKENS], row[TTFT], row[LAST_TOKEN]
    if ttft is None or last is None or tokens < 2:
        return None
    return float((last - (row[START] + ttft)) / (tokens - 1))


@dataclass
class RoundWindow:
    """One run's rows and its measured window (seconds from the run's start)."""

    rows: list[list[Any]]
    window: tuple[float, float]


@dataclass
class CellStats:
    """One (path, mode, concurrency) cell over all its rounds."""

    requests: int  # measured requests (started inside the window)
    errors: int
    latency_p50: float | None
    latency_p99: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    tokens_per_s: float
    requests_per_s: float
    round_tokens_per_s: list[float]  # one per round, to show the spread

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def window_rates(rows: Iterable[Sequence[Any]], window: tuple[float, float]) -> tuple[float, float]:
    """(tokens/s, requests/s) inside `window`, each successful request's work spread
    evenly over its lifetime. Counting only whole requests that end inside a short
    window quantises the rate (at 1 concurrent request, 4 s hold about 12 of them);
    spreading it gives the same long-run rate without the steps."""
    lo, hi = window
    span = hi - lo
    if span <= 0:
        raise ValueError(f"empty window {window}")
    tokens = requests = 0.0
    for r in rows:
        life = r[END] - r[START]
        if not r[OK] or life <= 0:
            continue
        share = overlap((r[START], r[END]), window) / life
        tokens += share * int(r[TOKENS])
        requests += share
    return tokens / span, requests / span


def cell_stats(rounds: Iterable[RoundWindow]) -> CellStats:
    """Latency figures from requests that started in the window (after warm-up);
    throughput from the work done inside it (see window_rates), over all rounds."""
    measured: list[list[Any]] = []
    per_round: list[float] = []
    per_round_requests: list[float] = []
    for rnd in rounds:
        lo, hi = rnd.window
        measured += [r for r in rnd.rows if not r[WARM] and lo <= r[START] < hi]
        tps, rps = window_rates(rnd.rows, rnd.window)
        per_round.append(tps)
        per_round_requests.append(rps)
    ok = [r for r in measured if r[OK]]
    latency = [r[END] - r[START] for r in ok]
    ttft = [r[TTFT] for r in ok if r[TTFT] is not None]
    itl = [x for x in (request_itl(r) for r in ok) if x is not None]
    return CellStats(
        requests=len(measured),
        errors=len(measured) - len(ok),
        latency_p50=percentile(latency, 0.5),
        latency_p99=percentile(latency, 0.99),
        ttft_p50=percentile(ttft, 0.5),
        ttft_p99=percentile(ttft, 0.99),
        itl_p50=percentile(itl, 0.5),
        itl_p99=percentile(itl, 0.99),
        tokens_per_s=statistics.fmean(per_round) if per_round else 0.0,
        requests_per_s=statistics.fmean(per_round_requests) if per_round_requests else 0.0,
        round_tokens_per_s=per_round,
    )


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def added_ms(value: float | None, base: float | None) -> float | None:
    if value is None or base is None:
        return None
    return (value - base) * 1000.0


@dataclass
class Comparison:
    """A path against direct, for one (mode, concurrency)."""

    latency_p50_ratio: float | None
    latency_p99_ratio: float | None
    ttft_p50_ratio: float | None
    itl_p50_ratio: float | None
    throughput_ratio: float | None
    requests_ratio: float | None
    added_latency_p50_ms: float | None
    added_ttft_p50_ms: float | None
    throughput_ratio_range: tuple[float, float] | None  # min, max over paired rounds

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(path: CellStats, direct: CellStats) -> Comparison:
    paired = [
        p / d
        for p, d in zip(path.round_tokens_per_s, direct.round_tokens_per_s, strict=False)
        if d > 0
    ]
    return Comparison(
        latency_p50_ratio=ratio(path.latency_p50, direct.latency_p50),
        latency_p99_ratio=ratio(path.latency_p99, direct.latency_p99),
        ttft_p50_ratio=ratio(path.ttft_p50, direct.ttft_p50),
        itl_p50_ratio=ratio(path.itl_p50, direct.itl_p50),
        throughput_ratio=ratio(path.tokens_per_s, direct.tokens_per_s),
        requests_ratio=ratio(path.requests_per_s, direct.requests_per_s),
        added_latency_p50_ms=added_ms(path.latency_p50, direct.latency_p50),
        added_ttft_p50_ms=added_ms(path.ttft_p50, direct.ttft_p50),
        throughput_ratio_range=(min(paired), max(paired)) if paired else None,
    )


def median_range(values: Iterable[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the known values, or None."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return statistics.median(known), min(known), max(known)
