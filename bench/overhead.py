"""Path overhead: the same load straight to the engine, through Nginx only, and
through Nginx and the relay, measured in one run and reported as ratios to direct.

For each (mode, concurrency) the three paths take turns in short runs, for several
rounds, the order rotating each round: slow drift of a shared, noisy machine then
falls on every path alike, and the per-round ratios show how much noise there is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import RunSpec, rotating_plan
from bench.stats import CellStats, Comparison, RoundWindow, cell_stats, compare

PATHS = ("direct", "nginx", "relay")
MODES = (True, False)  # streaming, then non-streaming


@dataclass(frozen=True)
class OverheadConfig:
    concurrencies: tuple[int, ...] = (1, 16, 64)
    rounds: int = 2
    duration: float = 4.0  # measured seconds per run
    warmup: float = 0.5  # opens the connections; its requests are left out
    max_tokens: int = 32
    timeout: float = 30.0


def plan(urls: dict[str, str], cfg: OverheadConfig) -> list[RunSpec]:
    """Every run, in the order they are made (paths rotate each round)."""
    specs = []
    for stream in MODES:
        mode = "stream" if stream else "nonstream"
        specs += rotating_plan(
            urls,
            PATHS,
            cfg,
            stream=stream,
            name="{path}/" + mode + "/c{c}/r{r}",
            # Far above what the engine's latency allows in `duration`.
            max_requests=lambda c: max(200, c * 100),
        )
    return specs


def run_loadgen(
    specs: list[RunSpec], timeout: float, cpu_files: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run the plan in a separate process (the load must not share our CPU time)."""
    with tempfile.TemporaryDirectory(prefix="sglang-ha-bench-load-") as tmp:
        plan_file, out_file = Path(tmp, "plan.json"), Path(tmp, "out.json")
        plan_file.write_text(json.dumps([asdict(s) for s in specs]))
        cmd = [sys.executable, "-m", "bench.loadgen", str(plan_file), str(out_file)]
        if cpu_files:
            Path(tmp, "cpu.json").write_text(json.dumps(cpu_files))
            cmd += ["--cpu", str(Path(tmp, "cpu.json"))]
        subprocess.run(cmd, check=True, timeout=timeout)
        data: list[dict[str, Any]] = json.loads(out_file.read_text())
        return data


@dataclass
class Cell:
    mode: str
    concurrency: int
    path: str
    stats: CellStats
    vs_direct: Comparison | None
    cpu: dict[str, float] = field(default_factory=dict)  # mean cores used over the rounds

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "path": self.path,
            "stats": self.stats.to_json(),
            "vs_direct": self.vs_direct.to_json() if self.vs_direct else None,
            "cpu": self.cpu,
        }


def aggregate(runs: list[dict[str, Any]]) -> list[Cell]:
    grouped: dict[tuple[str, int, str], list[RoundWindow]] = {}
    cpu: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for run in runs:
        spec = run["spec"]
        mode = "stream" if spec["stream"] else "nonstream"
        key = (mode, int(spec["concurrency"]), spec["path"])
        lo, hi = run["window"]
        grouped.setdefault(key, []).append(RoundWindow(run["samples"], (lo, hi)))
        if run.get("cpu"):
            cpu.setdefault(key, []).append(run["cpu"])
    cells: list[Cell] = []
    for (mode, c, path), rounds in grouped.items():
        cells.append(
            Cell(mode, c, path, cell_stats(rounds), None, mean_cores(cpu.get((mode, c, path), [])))
        )
    direct = {(x.mode, x.concurrency): x.stats for x in cells if x.path == "direct"}
    for x in cells:
        base = direct.get((x.mode, x.concurrency))
        if base is not None and x.path != "direct":
            x.vs_direct = compare(x.stats, base)
    return cells


def mean_cores(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per part, the mean of the rounds that measured it."""
    names = {name for r in rounds for name in r}
    return {
        name: round(sum(r[name] for r in rounds if name in r) / sum(name in r for r in rounds), 3)
        for name in sorted(names)
    }


def run(
    urls: dict[str, str], cfg: OverheadConfig, cpu_files: dict[str, str] | None = None
) -> tuple[list[Cell], list[dict[str, Any]]]:
    specs = plan(urls, cfg)
    budget = len(specs) * (cfg.warmup + cfg.duration + cfg.timeout) + 60
    runs = run_loadgen(specs, timeout=budget, cpu_files=cpu_files)
    return aggregate(runs), runs
