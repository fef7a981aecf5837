"""The failover harness's verdicts in pair and pool mode (tests/failover/runner.py),
from recorded requests and sampled views, without a stack."""

from __future__ import annotations

from pathlib import Path

from tests.failover import report
from tests.failover.load import RequestRecord
from tests.failover.runner import (
    Sample,
    ScenarioResult,
    assert_clean_failover,
    misses,
    summarise,
    trial_with_one_retry,
)
from tests.failover.scenarios import Fault

FAULT = Fault("engine-kill", "kill -9", lambda s, n: None, lambda s, n: None)
NAMES = ("sglang-01", "sglang-02", "sglang-03")


def sample(t: float, down: str | None = None, failed: str | None = None) -> Sample:
    """Three pool nodes; none of them leaves `standby` (a pool promotes nobody)."""
    roles = {n: "standby" for n in NAMES}
    roles["sglang-01"] = "primary"  # the lease holder
    engines = {n: "healthy" for n in NAMES}
    if down:
        engines[down] = "dead"
    return Sample(t, roles, engines, None, {n: n == failed for n in NAMES})


def pool_traffic() -> list[RequestRecord]:
    """Every node serves before the fault at 10 s, a request every third of a second;
    a stream that outlives the fault, then the survivors' answers."""
    records = [
        RequestRecord(t / 3, t / 3 + 0.5, stream, True, NAMES[t % 3])
        for t in range(30)
        for stream in (False, True)
    ]
    records.append(RequestRecord(9.5, 11.5, True, True, "sglang-03", max_gap=0.2))
    records += [RequestRecord(10.2 + t, 10.7 + t, False, True, NAMES[t % 2]) for t in range(6)]
    return records


def pool_samples() -> list[Sample]:
    return [sample(9.9), sample(10.05), sample(10.3, down="sglang-02", failed="sglang-02")]


def test_a_pool_fault_is_detected_on_the_struck_node_without_a_promotion() -> None:
    result = summarise(
        FAULT, 2, "sglang-02", "sglang-01", 10.0, 18.0, pool_traffic(), pool_samples(), "pool"
    )
    assert result.mode == "pool"
    assert result.detected is not None and abs(result.detected - 0.3) < 1e-9
    # Nobody is promoted in a pool; a survivor answered at once.
    assert result.promoted is None
    assert result.first_success is not None and result.first_success < 1.0
    assert result.nonstream_failed == result.stream_failed == 0
    result.rejoined_as_standby = True  # what run_scenario found: back in the rotation
    assert_clean_failover(result)


def test_the_pair_still_needs_a_promotion() -> None:
    samples = [sample(9.9), sample(10.3, down="sglang-01")]
    result = summarise(FAULT, 1, "sglang-01", "sglang-02", 10.0, 18.0, pool_traffic(), samples)
    assert result.mode == "pair" and result.promoted is None
    result.rejoined_as_standby = True
    try:
        assert_clean_failover(result)
    except AssertionError:
        return
    raise AssertionError("a pair failover without a promoted standby passed")


def test_a_failed_request_in_a_pool_is_counted() -> None:
    records = [*pool_traffic(), RequestRecord(10.1, 10.4, True, False, None, error="HTTP 502")]
    result = summarise(
        FAULT, 1, "sglang-02", "sglang-01", 10.0, 18.0, records, pool_samples(), "pool"
    )
    assert result.stream_failed == 1


def test_the_report_says_the_mode_and_the_stack(tmp_path: Path) -> None:
    result = summarise(
        FAULT, 1, "sglang-02", "sglang-01", 10.0, 18.0, pool_traffic(), pool_samples(), "pool"
    )
    result.rejoined_as_standby = True
    report.write([result], tmp_path, {"mode": "pool", "nodes": 3, "commit": "abc123"})
    text = (tmp_path / "failover-report.md").read_text()
    assert "Stack: mode pool, nodes 3, commit abc123" in text
    assert "first success on a survivor s" in text and "rejoined the rotation" in text
    assert "| engine-kill | 1 |" in text and "| 1/1 |" in text
    assert (tmp_path / "timeline-engine-kill-1.png").stat().st_size > 0


def pair_result(trial: int, late: float = 0.0, fail: bool = False) -> ScenarioResult:
    """A pair's trial: promoted at 0.5 s, the old primary back as standby; with `late`,
    one request that started `late` s after the fault was slow; with `fail`, a request
    failed."""
    records = [RequestRecord(t / 3, t / 3 + 0.3, False, True, "sglang-01") for t in range(30)]
    records += [
        RequestRecord(10.2 + t / 3, 10.5 + t / 3, False, True, "sglang-02") for t in range(40)
    ]
    if late:
        records.append(RequestRecord(10.0 + late, 12.0 + late, False, True, "sglang-02"))
    if fail:
        records.append(RequestRecord(10.1, 10.2, False, False, "sglang-01", error="reset"))
    samples = [sample(9.9), sample(10.5, down="sglang-01")]
    samples[-1].roles = {"sglang-01": "standby", "sglang-02": "primary", "sglang-03": "standby"}
    result = summarise(FAULT, trial, "sglang-01", "sglang-02", 10.0, 18.0, records, samples)
    result.rejoined_as_standby = True
    return result


def test_a_slow_request_past_the_target_misses_the_recovery_time_only() -> None:
    assert misses(pair_result(1)) == []
    slow = pair_result(1, late=5.0)
    assert misses(slow) == ["recovery time"]
    assert slow.late_disturbed and slow.late_disturbed[0]["start"] == 5.0
    assert misses(pair_result(1, late=5.0, fail=True)) == ["failed non-stream", "recovery time"]


def test_only_a_missed_recovery_time_gets_a_second_trial() -> None:
    runs: list[int] = []

    def trial(slow_trials: set[int], fail: bool = False):  # type: ignore[no-untyped-def]
        def run(n: int) -> ScenarioResult:
            runs.append(n)
            return pair_result(n, late=5.0 if n in slow_trials else 0.0, fail=fail)

        return run

    assert trial_with_one_retry(trial({1})).trial == 2 and runs == [1, 2]
    runs.clear()
    # Slow every time: the second trial's miss stands.
    assert misses(trial_with_one_retry(trial({1, 2}))) == ["recovery time"] and runs == [1, 2]
    runs.clear()
    # A failed request is never tried again.
    assert misses(trial_with_one_retry(trial({1}, fail=True))) and runs == [1]
    runs.clear()
    assert trial_with_one_retry(trial(set())).trial == 1 and runs == [1]
