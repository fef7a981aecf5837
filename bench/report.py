"""bench/results: JSON with the machine's description, a Markdown summary, plots."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench.failover import BENCH_FAULTS, SYSTEMS, Trial
from bench.overhead import PATHS, Cell, OverheadConfig
from bench.stats import median_range
from tests.support.provenance import commit, run_text

FAULT_LABELS = {
    "engine-kill": "crash (kill -9 engine)",
    "container-kill": "container kill",
    "container-pause": "freeze (docker pause)",
    "nic-down": "NIC down",
    "engine-hang": "hang (/health 200)",
}
SYSTEM_LABELS = {
    "sglang-ha": "sglang-ha (Nginx + relay + agents)",
    "nginx-article": "article's Nginx (primary + backup)",
    "router-default": "sglang-router, defaults",
    "router-hc1s": "sglang-router, 1 s health checks (2 s timeout)",
}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": commit(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "docker": run_text("docker", "version", "--format", "{{.Server.Version}}"),
        "compose": run_text("docker", "compose", "version", "--short"),
        "python": platform.python_version(),
        "gpu": None,
        "note": "shared development machine: compare ratios from one run, not absolute times",
    }


def _ms(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v * 1000:.{digits}f}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.2f}"


def overhead_targets(cells: list[Cell]) -> dict[str, Any]:
    """The issue's targets, read at 64 concurrent streams, relay path vs direct."""
    cell = next(
        (c for c in cells if c.mode == "stream" and c.concurrency == 64 and c.path == "relay"),
        None,
    )
    if cell is None or cell.vs_direct is None:
        return {}
    v = cell.vs_direct
    return {
        "added_latency_p50_ms": v.added_latency_p50_ms,
        "added_ttft_p50_ms": v.added_ttft_p50_ms,
        "throughput_ratio": v.throughput_ratio,
        "latency_target_met": v.added_latency_p50_ms is not None
        and v.added_latency_p50_ms <= 1.0
        and (v.added_ttft_p50_ms is None or v.added_ttft_p50_ms <= 1.0),
        "throughput_target_met": v.throughput_ratio is not None and v.throughput_ratio >= 0.95,
    }


def overhead_markdown(cells: list[Cell], cfg: OverheadConfig, engine: dict[str, Any]) -> str:
    order = {p: i for i, p in enumerate(PATHS)}
    rows = sorted(cells, key=lambda c: (c.mode != "stream", c.concurrency, order[c.path]))
    lines = [
        "| mode | conc. | path | requests (errors) | p50 ms | p99 ms | TTFT p50 ms | ITL p50 ms"
        " | tokens/s | req/s | p50 × | p99 × | TTFT × | ITL × | tokens/s × (rounds) |"
        " added p50 ms | added TTFT ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        s, v = c.stats, c.vs_direct
        spread = (
            f" ({v.throughput_ratio_range[0]:.3f}–{v.throughput_ratio_range[1]:.3f})"
            if v and v.throughput_ratio_range
            else ""
        )
        lines.append(
            f"| {c.mode} | {c.concurrency} | {c.path} | {s.requests} ({s.errors}) |"
            f" {_ms(s.latency_p50)} | {_ms(s.latency_p99)} | {_ms(s.ttft_p50)} |"
            f" {_ms(s.itl_p50, 2)} | {s.tokens_per_s:.0f} | {s.requests_per_s:.1f} |"
            + (
                f" {_x(v.latency_p50_ratio)} | {_x(v.latency_p99_ratio)} |"
                f" {_x(v.ttft_p50_ratio)} | {_x(v.itl_p50_ratio)} |"
                f" {_x(v.throughput_ratio)}{spread} | {_signed(v.added_latency_p50_ms)} |"
                f" {_signed(v.added_ttft_p50_ms)} |"
                if v
                else " 1 | 1 | 1 | 1 | 1 | 0 | 0 |"
            )
        )
    t = overhead_targets(cells)
    if t:
        lines += [
            "",
            "Targets, relay path vs direct at 64 concurrent streams:",
            f"- p50 added latency ≤ 1 ms: end-to-end {_signed(t['added_latency_p50_ms'])} ms,"
            f" TTFT {_signed(t['added_ttft_p50_ms'])} ms"
            f" — **{'met' if t['latency_target_met'] else 'missed'}**",
            f"- throughput ≥ 95 % of direct: {t['throughput_ratio'] * 100:.1f} %"
            f" — **{'met' if t['throughput_target_met'] else 'missed'}**",
        ]
    lines += cpu_markdown(rows)
    lines += [
        "",
        f"Load: closed loop, `/v1/chat/completions`, {cfg.max_tokens} tokens per request"
        f" (`ignore_eos`), {cfg.rounds} rounds × {cfg.duration:g} s measured"
        f" (+{cfg.warmup:g} s warm-up) per path and cell, paths in rotating order."
        f" Engine: simulator, {engine}. × = ratio to direct (lower is better for"
        " latencies, higher for tokens/s).",
    ]
    return "\n".join(lines) + "\n"


def cpu_markdown(rows: list[Cell]) -> list[str]:
    """Cores each part used during the runs: is the path slow, or the machine full?"""
    measured = [c for c in rows if c.cpu]
    if not measured:
        return []
    parts = sorted({name for c in measured for name in c.cpu} - {"host"})
    lines = [
        "",
        "CPU used during the measured runs, in cores (mean of the rounds; `host` is"
        " every process on the machine, all cores):",
        "",
        "| mode | conc. | path | host | " + " | ".join(parts) + " |",
        "|---|---|---|---|" + "---|" * len(parts),
    ]
    for c in measured:
        values = [f"{c.cpu[p]:.2f}" if p in c.cpu else "—" for p in ["host", *parts]]
        lines.append(f"| {c.mode} | {c.concurrency} | {c.path} | " + " | ".join(values) + " |")
    return lines


def _dist(values: list[float | None], digits: int = 2) -> str:
    mr = median_range(values)
    if mr is None:
        return "—"
    med, lo, hi = mr
    if lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def failover_markdown(trials: list[Trial], hold: float, observe: float, concurrency: int) -> str:
    lines = [
        "| fault | system | trials | requests | failed non-stream | failed streams |"
        " 100 % success after s, median (range) | new requests all OK after s (open-loop"
        " probe; failed) | p99 latency in flight during the fault s, median (range) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fault in BENCH_FAULTS:
        for system in SYSTEMS:
            ts = [t for t in trials if t.fault == fault and t.system == system]
            if not ts:
                continue
            rs = [t.result for t in ts]
            never = sum(1 for t in ts if t.recovered is None)
            rec = _dist([t.recovered for t in ts])
            if never:
                rec += f"; not within the run in {never}"
            probe_failed = sum(
                t.probe.nonstream_failed + t.probe.stream_failed for t in ts if t.probe
            )
            missed = sum(1 for t in ts if not t.fault_on_serving_node)
            note = f" ({missed} with the fault off its serving engine)" if missed else ""
            lines.append(
                f"| {FAULT_LABELS[fault]} | {SYSTEM_LABELS[system]}{note} | {len(ts)} |"
                f" {sum(r.requests for r in rs)} | {sum(r.nonstream_failed for r in rs)} |"
                f" {sum(r.stream_failed for r in rs)} | {rec} |"
                f" {_dist([t.probe_recovered for t in ts])}; {probe_failed} |"
                f" {_dist([t.p99_in_flight for t in ts])} |"
            )
    lines += [
        "",
        f"Each trial: {concurrency} concurrent `openai` clients (every second request a"
        " stream, 48 tokens), warm-up, the fault for"
        f' {hold:g} s, healed, {observe:g} s more. "100 % success after" is the'
        " failover harness's `recovered`: from then on every request that starts succeeds"
        " and is not slowed down (failed, or a stream gap > 2 × the pre-fault p99 gap"
        " + 0.3 s, or a latency > 1.5 × the pre-fault p99 + 0.3 s). A value at or above"
        f" {hold:g} s means the system only recovered because the fault was healed."
        " The load is a closed loop: a client waits for its answer before it sends"
        " the next request, so while every client hangs on a frozen engine no new"
        " request shows whether the front-end would serve it. The open-loop probe"
        " (one request every 0.25 s, streams and not alternately, same definition of"
        ' disturbed) answers that. "In flight during the fault": started before it'
        " healed and ended after it began. Failed streams include streams cut"
        " mid-answer.",
    ]
    return "\n".join(lines) + "\n"


def plot_overhead(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, mode in zip(axes, ("stream", "nonstream"), strict=True):
        concs = sorted({c.concurrency for c in cells if c.mode == mode})
        width = 0.2
        for k, (p, metric, label) in enumerate(
            (
                ("nginx", "throughput_ratio", "Nginx only: tokens/s"),
                ("relay", "throughput_ratio", "Nginx + relay: tokens/s"),
                ("nginx", "latency_p50_ratio", "Nginx only: p50 latency"),
                ("relay", "latency_p50_ratio", "Nginx + relay: p50 latency"),
            )
        ):
            vals = []
            for conc in concs:
                cell = next(
                    (x for x in cells if x.mode == mode and x.concurrency == conc and x.path == p),
                    None,
                )
                v = getattr(cell.vs_direct, metric) if cell and cell.vs_direct else None
                vals.append(v or 0.0)
            xs = [i + (k - 1.5) * width for i in range(len(concs))]
            ax.bar(xs, vals, width, label=label, hatch="//" if "latency" in metric else None)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.95, color="tab:red", lw=0.8, ls="--", label="95 % (throughput target)")
        ax.set_xticks(range(len(concs)), [f"{c} concurrent" for c in concs])
        ax.set_ylim(0.8, 1.2)
        ax.set_ylabel("ratio to direct")
        ax.set_title(f"{mode}: ratio to direct engine access")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_failover(trials: list[Trial], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    systems = [s for s in SYSTEMS if any(t.system == s for t in trials)]
    width = 0.8 / max(len(systems), 1)
    for k, system in enumerate(systems):
        failed: list[int] = []
        recovered: list[float] = []
        probed: list[float] = []
        for fault in BENCH_FAULTS:
            ts = [t for t in trials if t.fault == fault and t.system == system]
            failed.append(sum(t.result.nonstream_failed + t.result.stream_failed for t in ts))
            for values, series in (
                ([t.recovered for t in ts], recovered),
                ([t.probe_recovered for t in ts], probed),
            ):
                mr = median_range(values)
                series.append(mr[0] if mr else 0.0)
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(BENCH_FAULTS))]
        bars: tuple[list[int], list[float], list[float]] = (failed, recovered, probed)
        for ax, heights in zip(axes, bars, strict=True):
            ax.bar(xs, heights, width, label=SYSTEM_LABELS[system])
    labels = [FAULT_LABELS[f].split(" (")[0] for f in BENCH_FAULTS]
    for ax, title in zip(
        axes,
        (
            "failed requests (all trials)",
            "s until 100 % success, closed-loop load (median)",
            "s until new requests all OK, open-loop probe (median)",
        ),
        strict=True,
    ):
        ax.set_xticks(range(len(BENCH_FAULTS)), labels, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
