"""What the clients saw after the kill in the pair/pool runs of 2026-12-07 16:20-18:22
UTC (docs/benchmarks.md, "Each request timed by its own budget"): per run, the requests
admitted after the kill, how long they waited for their first token, and the refusals.

    python bench/results/shedding-runs/2026-12-07-budget-pace-runs.py
"""

from __future__ import annotations

import gzip
import json
import re
import statistics
from pathlib import Path

HERE = Path(__file__).parent
RUNS = [
    "2026-12-07-1620-pair-one-burner-928842c",
    "2026-12-07-1636-pair-half-burner",
    "2026-12-07-1639-pool-quiet",
    "2026-12-07-1642-pair-quiet",
    "2026-12-07-1817-pair-half-burner-2",
    "2026-12-07-1819-pair-half-burner-3",
]
BOUND = 10.0


def killed_at(log: str) -> float:
    match = re.search(r'"killed_at": ([0-9.]+)', log)
    assert match, "no killed_at in the log"
    return float(match.group(1))


def main() -> None:
    print(
        "| run | admitted after the kill: long, side load | first token > 10 s (long, side)"
        " | side load: first token median, max | refusals after the kill: median, max |"
    )
    print("|---|---|---|---|---|")
    for run in RUNS:
        killed = killed_at((HERE / f"{run}.log").read_text())
        with gzip.open(HERE / f"{run}-records.json.gz") as f:
            records = json.load(f)["records"]
        after = [r for r in records if r["sent"] > killed]
        served = [r for r in after if r["status"] == 200]
        heavy = [r for r in served if r["group"] == "heavy"]
        light = [r for r in served if r["group"] == "light"]
        late = [sum((r["ttft"] or 0) > BOUND for r in g) for g in (heavy, light)]
        ttft = [r["ttft"] or 0.0 for r in light]
        shed = sorted(r["took"] for r in after if r["status"] == 429)
        print(
            f"| {run} | {len(heavy)}, {len(light)} | {late[0]}, {late[1]}"
            f" | {statistics.median(ttft):.2f} s, {max(ttft):.1f} s"
            f" | {statistics.median(shed) * 1000:.0f} ms, {shed[-1]:.2f} s |"
        )


if __name__ == "__main__":
    main()
