"""Capacity: how many streamed events per second each path carries, and at what CPU.

One simulator engine (the primary, ITL 10 ms), closed-loop clients each streaming
128-token chat completions (`ignore_eos`), at 64 and 128 concurrent streams,
through six paths in turn: straight to the engine, Nginx alone (`proxy_buffering
off`, the gateway's own configuration) with one worker and with as many as the
stack's gateway runs, SGLang's router with one worker URL, and our gateway (Nginx +
relay) with one relay worker (and one Nginx worker) and with one per CPU. Each run
lasts `duration` measured seconds after a warm-up; the paths rotate each round, so
slow drift of a shared machine falls on all alike.

Per path: content events received per second inside the measured window (by
arrival time, so a long stream counts where its events land), that rate over
direct's in the same round, TTFT p50 of the requests started in the window, the
p99 gap between consecutive events of a stream, the proxy's CPU (its container's
cgroup counter, read around the run) and its CPU per event.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from bench.loadgen import RunSpec, rotating_plan
from bench.overhead import run_loadgen

PATHS = ("direct", "nginx", "nginx-nw", "router", "gateway-1w", "gateway")
# The container whose CPU is the path's proxy (see OurStack.cpu_files).
PROXY = {
    "nginx": "nginx-direct",
    "nginx-nw": "nginx-direct-nw",
    "router": "router-direct",
    "gateway-1w": "gateway-1w",
    "gateway": "gateway (Nginx + relay)",
}
LABELS = {
    "direct": "direct to the engine",
    "nginx": "Nginx alone (1 worker, proxy_buffering off)",
    "nginx-nw": "Nginx alone ({workers}, as the gateway's own Nginx)",
    "router": "SGLang router (Rust), 1 worker URL",
    "gateway-1w": "our gateway (Nginx + relay), 1 relay worker, 1 Nginx worker",
    "gateway": "our gateway (Nginx + relay), {n} relay workers, {nginx}",
}


@dataclass(frozen=True)
class CapacityConfig:
    concurrencies: tuple[int, ...] = (64, 128)
    rounds: int = 2
    duration: float = 10.0
    warmup: float = 2.0  # every stream opened and generating before the window
    max_tokens: int = 128
    timeout: float = 60.0


def plan(urls: dict[str, str], cfg: CapacityConfig) -> list[RunSpec]:
    # Nginx alone at the gateway's count only where that is not the one-worker path.
    return rotating_plan(
        urls,
        [p for p in PATHS if p in urls],
        cfg,
        stream=True,
        name="capacity/{path}/c{c}/r{r}",
        # Far above what 10 ms per token allows in the run.
        max_requests=lambda c: c * 40,
    )


@dataclass
class Row:
    concurrency: int
    path: str
    events_per_s: float
    vs_direct: float | None  # mean over rounds of (this round's rate / direct's)
    vs_direct_rounds: list[float]
    ttft_p50_ms: float | None
    itl_p99_ms: float | None
    proxy_cores: float | None
    cpu_per_event_us: float | None
    # The proxy's CPU while it carries nothing (during the direct runs of the same
    # rounds: health checks, topology polls), and CPU per event with that taken off.
    idle_cores: float | None
    marginal_us: float | None
    errors: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _percentile(hist: dict[float, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for gap in sorted(hist):
        seen += hist[gap]
        if seen >= q * total:
            return gap
    return max(hist)


def aggregate(runs: list[dict[str, Any]]) -> list[Row]:
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in runs:
        spec = run["spec"]
        by_key.setdefault((int(spec["concurrency"]), spec["path"]), []).append(run)

    def rate(run: dict[str, Any]) -> float:
        lo, hi = run["window"]
        return float(run["window_events"]) / (hi - lo)

    rows = []
    for (c, path), group in sorted(
        by_key.items(), key=lambda kv: (kv[0][0], PATHS.index(kv[0][1]))
    ):
        rates = [rate(r) for r in group]
        direct = {
            r["spec"]["name"].rsplit("/", 1)[1]: rate(r) for r in by_key.get((c, "direct"), [])
        }
        ratios = [
            rate(r) / direct[rnd]
            for r in group
            if (rnd := r["spec"]["name"].rsplit("/", 1)[1]) in direct and direct[rnd] > 0
        ]
        hist: dict[float, int] = {}
        for r in group:
            for gap, n in r["itl_ms"]:
                hist[float(gap)] = hist.get(float(gap), 0) + int(n)
        ttfts = [
            s[5]
            for r in group
            for s in r["samples"]
            if not s[3] and s[2] and s[5] is not None and s[0] < r["window"][1]
        ]
        proxy = PROXY.get(path)
        cores = [r["cpu"][proxy] for r in group if proxy and proxy in r.get("cpu", {})]
        cpu_seconds = sum(
            r["cpu"][proxy] * r["metered_seconds"]
            for r in group
            if proxy and proxy in r.get("cpu", {})
        )
        events = sum(r["metered_events"] for r in group if proxy and proxy in r.get("cpu", {}))
        idle = [
            r["cpu"][proxy]
            for r in by_key.get((c, "direct"), [])
            if proxy and proxy in r.get("cpu", {})
        ]
        idle_cores = statistics.mean(idle) if idle else None
        idle_seconds = sum(
            (idle_cores or 0.0) * r["metered_seconds"]
            for r in group
            if proxy and proxy in r.get("cpu", {})
        )
        rows.append(
            Row(
                concurrency=c,
                path=path,
                events_per_s=round(statistics.mean(rates), 1),
                vs_direct=round(statistics.mean(ratios), 3)
                if ratios and path != "direct"
                else None,
                vs_direct_rounds=[round(x, 3) for x in ratios] if path != "direct" else [],
                ttft_p50_ms=round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
                itl_p99_ms=_percentile(hist, 0.99),
                proxy_cores=round(statistics.mean(cores), 3) if cores else None,
                cpu_per_event_us=round(cpu_seconds / events * 1e6, 1) if events and cores else None,
                idle_cores=None if idle_cores is None else round(idle_cores, 3),
                marginal_us=(
                    round((cpu_seconds - idle_seconds) / events * 1e6, 1)
                    if events and cores and idle_cores is not None
                    else None
                ),
                errors=sum(1 for r in group for s in r["samples"] if not s[3] and not s[2]),
            )
        )
    return rows


def run(
    urls: dict[str, str], cfg: CapacityConfig, cpu_files: dict[str, str]
) -> tuple[list[Row], list[dict[str, Any]]]:
    specs = plan(urls, cfg)
    budget = len(specs) * (cfg.warmup + cfg.duration + cfg.timeout) + 60
    runs = run_loadgen(specs, timeout=budget, cpu_files=cpu_files)
    return aggregate(runs), runs


def _workers(n: int, noun: str = "worker") -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def targets(rows: list[Row], workers: int, nginx_workers: int = 1) -> list[dict[str, Any]]:
    """The bars, checked on this run. Issue 17: gateway ≥ 0.97 × direct's events/s at
    64 streams and ≥ 0.95 × at 128; gateway CPU per event ≤ the router's at 64.
    Issue 27 (the gateway is two hops): its CPU per event ≤ Nginx alone's (at the
    gateway's own Nginx worker count) + the router's, both measured in this run, at
    every concurrency."""
    got = {(r.concurrency, r.path): r for r in rows}
    out = []
    for c, floor in ((64, 0.97), (128, 0.95)):
        row = got.get((c, "gateway"))
        if row is not None and row.vs_direct is not None:
            out.append(
                {
                    "issue": 17,
                    "what": f"gateway ({workers} workers) events/s vs direct, {c} streams",
                    "target": f">= {floor}",
                    "measured": row.vs_direct,
                    "met": row.vs_direct >= floor,
                }
            )
    ours, router = got.get((64, "gateway")), got.get((64, "router"))
    if ours and router and ours.cpu_per_event_us and router.cpu_per_event_us:
        out.append(
            {
                "issue": 17,
                "what": "gateway CPU per event vs the router's, 64 streams (µs)",
                "target": f"<= {router.cpu_per_event_us}",
                "measured": ours.cpu_per_event_us,
                "met": ours.cpu_per_event_us <= router.cpu_per_event_us,
            }
        )
    for c in sorted({r.concurrency for r in rows}):
        router = got.get((c, "router"))
        # Each gateway against Nginx alone at its own Nginx's worker count (one per two
        # relay workers, ha_agent/gateway/edge/workers.py): like for like, since a second Nginx
        # worker costs CPU per event of its own (fewer events per wake-up) whether or not
        # a relay sits behind it. Without that row (older runs), the one-worker Nginx.
        for path, label, nginx_path in (
            ("gateway", f"{workers} relay workers", "nginx-nw" if nginx_workers > 1 else "nginx"),
            ("gateway-1w", "1 relay worker", "nginx"),
        ):
            ours, nginx = got.get((c, path)), got.get((c, nginx_path))
            if nginx is None or nginx.cpu_per_event_us is None:
                nginx_path, nginx = "nginx", got.get((c, "nginx"))
            if not (ours and nginx and router):
                continue
            o, n, r = ours.cpu_per_event_us, nginx.cpu_per_event_us, router.cpu_per_event_us
            if o is None or n is None or r is None:
                continue
            bar = round(n + r, 1)
            baseline = nginx_workers if nginx_path == "nginx-nw" else 1
            out.append(
                {
                    "issue": 27,
                    "what": f"gateway ({label}) CPU per event vs Nginx alone"
                    f" ({_workers(baseline)}) + router, {c} streams (µs)",
                    "target": f"<= {bar} ({n} + {r})",
                    "measured": o,
                    "met": o <= bar,
                }
            )
    return out


def markdown(
    rows: list[Row], cfg: CapacityConfig, workers: int, nginx_workers: int, engine: str
) -> str:
    def fmt(x: float | None, spec: str = ".0f") -> str:
        return "—" if x is None else format(x, spec)

    def label(path: str) -> str:
        return LABELS[path].format(
            n=workers,
            workers=_workers(nginx_workers),
            nginx=_workers(nginx_workers, "Nginx worker"),
        )

    lines = [
        f"Engine: one simulator ({engine}); {cfg.max_tokens}-token chat streams"
        f" (`ignore_eos`), closed loop; {cfg.rounds} rounds × {cfg.duration:.0f} s per"
        f" path (after {cfg.warmup:.0f} s warm-up), paths rotating. Proxy CPU: the"
        " proxy container's cgroup counter over the run (the gateway's is Nginx and"
        " relay together); idle CPU: the same counter during the direct runs, when the"
        " proxy carries nothing (health checks, topology polls).",
        "",
    ]
    for c in cfg.concurrencies:
        lines += [
            f"**{c} streams**",
            "",
            "| path | events/s | vs direct (per round) | TTFT p50 | ITL p99 | proxy CPU"
            " | CPU per event | idle CPU | CPU per event above idle | failed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.concurrency == c):
            rounds = ", ".join(f"{x:.2f}" for x in r.vs_direct_rounds)
            ratio = "1.00" if r.path == "direct" else f"{fmt(r.vs_direct, '.2f')} ({rounds})"
            lines.append(
                f"| {label(r.path)} | {r.events_per_s:.0f} | {ratio}"
                f" | {fmt(r.ttft_p50_ms)} ms | {fmt(r.itl_p99_ms)} ms"
                f" | {fmt(r.proxy_cores, '.2f')} cores"
                f" | {fmt(r.cpu_per_event_us)} µs | {fmt(r.idle_cores, '.3f')} cores"
                f" | {fmt(r.marginal_us)} µs | {r.errors} |"
            )
        lines.append("")
    verdict = targets(rows, workers, nginx_workers)
    if verdict:
        lines += ["| issue | target | bar | measured | met |", "|---|---|---|---|---|"]
        for t in verdict:
            lines.append(
                f"| {t.get('issue', 17)} | {t['what']} | {t['target']} | {t['measured']}"
                f" | {'yes' if t['met'] else 'NO'} |"
            )
        lines.append("")
    return "\n".join(lines)
