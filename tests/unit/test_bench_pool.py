"""The pool phase's arithmetic (bench/pool.py): requests/s per run, the comparison and
its targets, the Markdown table; no containers."""

from __future__ import annotations

from typing import Any

import pytest

from bench import pool
from bench.loadgen import RunSpec, body

CFG = pool.PoolConfig()


def run(system: str, answered: int, failed: int = 0, warm: int = 3) -> dict[str, Any]:
    """A loadgen run of 10 s measured after 3 s of warm-up."""
    rows: list[list[Any]] = []
    rows += [[0.1, 1.0, True, True, 32, None, None, None]] * warm  # warm-up: left out
    rows += [[4.0, 4.0 + i / answered, True, False, 32, None, None, None] for i in range(answered)]
    rows += [[5.0, 5.1, False, False, 0, None, None, "HTTP 429"]] * failed
    rows.append([12.5, 13.4, True, False, 32, None, None, None])  # ends after the window
    spec = {"path": system, "name": f"pool/{system}/c24/r1"}
    return {"spec": spec, "window": [3.0, 13.0], "samples": rows}


def test_requests_per_second_count_answers_inside_the_window() -> None:
    row = pool.run_row(run("pool", 120, failed=2))
    assert row["requests_per_s"] == pytest.approx(12.0)
    assert row["failed"] == 2 and row["errors"] == {"HTTP 429": 2}


def fault(system: str, name: str, failed: int) -> dict[str, Any]:
    return {"system": system, "fault": name, "failed": failed}


def test_the_summary_checks_the_issues_targets() -> None:
    runs = [
        pool.run_row(run("pair", 60)),
        pool.run_row(run("pair", 62)),
        pool.run_row(run("pool", 118)),
        pool.run_row(run("pool", 120)),
        pool.run_row(run("router", 110)),
        pool.run_row(run("router", 112)),
    ]
    faults = [
        fault("pair", "engine-kill", 0),
        fault("pool", "engine-kill", 0),
        fault("pool", "container-pause", 0),
        fault("router", "engine-kill", 5),
        fault("router", "container-pause", 9),
    ]
    s = pool.summary(runs, faults, CFG)
    assert s["requests_per_s"] == {"pair": 6.1, "pool": 11.9, "router": 11.1}
    assert s["pool_over_pair"] == pytest.approx(1.951, abs=1e-3)
    assert s["failed"]["router"] == {"engine-kill": 5, "container-pause": 9}
    assert all(s["targets"].values())
    # A pool that failed one request, or fell under the router, misses its target.
    s = pool.summary(runs[:4] + runs[4:] * 2, [*faults, fault("pool", "engine-kill", 1)], CFG)
    assert not s["targets"]["pool fails 0 on kill -9 and freeze"]
    slower = [*runs[:2], *runs[2:4], pool.run_row(run("router", 125))]
    assert not pool.summary(slower, faults, CFG)["targets"]["pool >= router"]
    md = pool.markdown(
        {"runs": runs, "faults": faults, "summary": pool.summary(runs, faults, CFG)}, CFG, 1
    )
    assert "| sglang-ha pool (2 nodes) | 11.90 (11.80, 12.00) | 0 | 0 |" in md
    assert "Pool over pair: 1.951x" in md


def test_the_slots_bound_the_rate() -> None:
    # 2 engines x 4 slots, 32 tokens at 20 ms: 12.5 requests/s at most.
    assert CFG.slot_bound == pytest.approx(12.5)


def test_conversations_give_each_prompt_its_own_prefix() -> None:
    spec = RunSpec("n", "pool", "http://x", False, 4, 1.0, 10, 5.0, conversations=3)
    prompts = {body(i, spec) for i in range(6)}
    assert len(prompts) == 6
    assert b"Conversation 1." in body(4, spec)
