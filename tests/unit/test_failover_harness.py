"""The failover harness's verdicts in pair and pool mode (tests/failover/runner.py),
from recorded requests and sampled views, without a stack."""

from __future__ import annotations

from pathlib import Path

from tests.failover import report
from tests.failover.load import RequestRecord
from tests.failover.runner import Sample, assert_clean_failover, summarise
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
