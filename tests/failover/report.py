"""failover-report.json, a Markdown table, and a timeline plot per scenario."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from tests.failover.runner import ScenarioResult


def machine() -> dict[str, Any]:
    import os

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _dist(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    if len(known) == 1:
        return f"{known[0]:.2f}"
    return f"{statistics.median(known):.2f} ({min(known):.2f}–{max(known):.2f})"


def markdown(results: list[ScenarioResult]) -> str:
    by_fault: dict[str, list[ScenarioResult]] = {}
    for r in results:
        by_fault.setdefault(r.fault, []).append(r)
    pool = bool(results) and results[0].mode == "pool"
    # A pool promotes no standby and every survivor serves throughout: its columns say so.
    first, rejoin = (
        ("first success on a survivor s", "rejoined the rotation")
        if pool
        else ("first success on standby s", "rejoined as standby")
    )
    lines = [
        f"| fault | trials | detected s | promoted s | {first} |"
        " 100 % success again s (target) | failed non-stream | failed streams |"
        " migrated streams | refused streams | tool streams at the fault: moved / refused |"
        f" text mismatches | p50 / p99 s | {rejoin} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fault, rs in by_fault.items():
        lines.append(
            f"| {fault} | {len(rs)} | {_dist([r.detected for r in rs])} |"
            f" {_dist([r.promoted for r in rs])} | {_dist([r.first_success for r in rs])} |"
            f" {_dist([r.recovered for r in rs])} (≤ {rs[0].target_recovery:g}) |"
            f" {sum(r.nonstream_failed for r in rs)} | {sum(r.stream_failed for r in rs)} |"
            f" {sum(r.migrations for r in rs)} | {sum(r.stream_refused for r in rs)} |"
            f" {sum(r.tool_streams_moved for r in rs)} /"
            f" {sum(r.tool_streams_refused for r in rs)} |"
            f" {sum(r.text_mismatches for r in rs)} |"
            f" {_fmt(statistics.median([r.p50 for r in rs]))} /"
            f" {_fmt(max(r.p99 for r in rs))} |"
            f" {sum(r.rejoined_as_standby for r in rs)}/{len(rs)} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: ScenarioResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    z = result.fault_at
    for stream, marker in ((False, "o"), (True, "^")):
        ok = [r for r in result.records if r["stream"] is stream and r["ok"]]
        bad = [r for r in result.records if r["stream"] is stream and not r["ok"]]
        kind = "stream" if stream else "non-stream"
        ax.scatter(
            [r["start"] - z for r in ok],
            [r["end"] - r["start"] for r in ok],
            s=12,
            marker=marker,
            c="tab:green",
            alpha=0.6,
            label=f"{kind} ok",
        )
        if bad:
            ax.scatter(
                [r["start"] - z for r in bad],
                [r["end"] - r["start"] for r in bad],
                s=30,
                marker="x",
                c="tab:red",
                label=f"{kind} failed",
            )
    ax.axvline(0, color="tab:red", lw=1.5, label=f"fault: {result.fault}")
    ax.axvline(result.healed_at - z, color="tab:gray", ls=":", label="fault healed")
    for value, label, color in (
        (result.detected, "detected", "tab:orange"),
        (result.promoted, "standby promoted", "tab:blue"),
        (result.first_success if result.mode == "pool" else None, "survivor served", "tab:blue"),
        (result.recovered, "100 % success again", "tab:green"),
    ):
        if value is not None:
            ax.axvline(value, color=color, ls="--", lw=1, label=f"{label} (+{value:.2f}s)")
    for change in result.role_history:
        if change["t"] > -1 and change["role"] == "primary":
            ax.annotate(
                f"{change['node']} primary",
                (change["t"], 0),
                fontsize=7,
                rotation=90,
                va="bottom",
                color="tab:blue",
            )
    ax.set_xlabel("seconds from the fault (request start)")
    ax.set_ylabel("request latency, s")
    ax.set_title(
        f"{result.mode}: {result.fault} on {result.primary_before} — trial {result.trial}:"
        f" {result.description}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: list[ScenarioResult], out: Path, stack: dict[str, Any] | None = None) -> None:
    """`stack`: what ran (mode, nodes, commit), written at the top of the report."""
    out.mkdir(parents=True, exist_ok=True)
    stack = stack or {"mode": results[0].mode if results else "pair"}
    payload = {
        "machine": machine(),
        "stack": stack,
        "scenarios": [r.to_json(with_records=False) for r in results],
    }
    (out / "failover-report.json").write_text(json.dumps(payload, indent=2))
    (out / "failover-requests.json").write_text(
        json.dumps([{"fault": r.fault, "trial": r.trial, "records": r.records} for r in results])
    )
    described = ", ".join(f"{k} {v}" for k, v in stack.items())
    (out / "failover-report.md").write_text(
        f"# Failover report\n\nStack: {described}\n\nMachine: {payload['machine']}\n\n"
        + markdown(results)
    )
    for r in results:
        plot(r, out / f"timeline-{r.fault}-{r.trial}.png")
