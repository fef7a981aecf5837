"""The benchmark's pure logic: statistics, ratios, the run plan, rendered configs.

No containers and no timing: rows are made up, numbers are exact.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from bench.cpu import CpuMeter, read_cpu_seconds, stat_fields
from bench.failover import Trial, in_flight_p99
from bench.overhead import PATHS, OverheadConfig, aggregate, plan
from bench.report import cpu_markdown
from bench.stacks import direct_nginx_conf, pick_subnet
from bench.stats import (
    RoundWindow,
    cell_stats,
    compare,
    median_range,
    percentile,
    request_itl,
    window_rates,
)
from bench.warming import Sample as WarmSample
from bench.warming import Variant, markdown
from bench.warming import body as warm_body
from tests.failover.load import RequestRecord
from tests.failover.runner import summarise
from tests.failover.scenarios import Fault
from tests.support.stack import ROOT


def row(
    start: float,
    end: float,
    ok: bool = True,
    warm: bool = False,
    tokens: int = 10,
    ttft: float | None = None,
    last: float | None = None,
) -> list[Any]:
    return [start, end, ok, warm, tokens, ttft, last, None if ok else "boom"]


def test_percentile_interpolates_and_handles_edges() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert percentile([1.0, 2.0], 0.0) == 1.0
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_request_itl_is_the_mean_gap_between_first_and_last_token() -> None:
    # started at 1.0, first token 0.1 s later, 11th token at 2.1: 10 gaps of 0.1 s
    assert request_itl(row(1.0, 2.2, tokens=11, ttft=0.1, last=2.1)) == pytest.approx(0.1)
    assert request_itl(row(0.0, 1.0, tokens=1, ttft=0.1, last=0.1)) is None
    assert request_itl(row(0.0, 1.0)) is None  # non-streaming


def test_window_rates_spread_each_request_over_its_life() -> None:
    # one request of 10 tokens over [0, 2], window [1, 3]: half of it falls inside
    tps, rps = window_rates([row(0.0, 2.0, tokens=10)], (1.0, 3.0))
    assert tps == pytest.approx(2.5)  # 5 tokens / 2 s
    assert rps == pytest.approx(0.25)
    # failed requests did no useful work
    assert window_rates([row(0.0, 2.0, ok=False)], (0.0, 2.0)) == (0.0, 0.0)
    with pytest.raises(ValueError):
        window_rates([], (2.0, 2.0))


def test_window_rates_equal_the_steady_rate_of_a_closed_loop() -> None:
    # one worker, back-to-back requests of 0.3 s and 6 tokens: 20 tokens/s exactly,
    # whatever the window's edges cut
    rows = [row(i * 0.3, (i + 1) * 0.3, tokens=6) for i in range(40)]
    tps, rps = window_rates(rows, (1.05, 9.05))
    assert tps == pytest.approx(20.0)
    assert rps == pytest.approx(1 / 0.3)


def test_cell_stats_use_only_measured_requests_for_latency() -> None:
    rows = [
        row(0.1, 5.0, warm=True),  # warm-up: a slow first connection, left out
        row(1.0, 1.5, ttft=0.05, last=1.45, tokens=10),
        row(1.5, 2.5, ttft=0.15, last=2.4, tokens=10),
        row(2.5, 3.0, ok=False),
        row(3.5, 4.0),  # starts after the window: left out
    ]
    s = cell_stats([RoundWindow(rows, (1.0, 3.0))])
    assert s.requests == 3
    assert s.errors == 1
    assert s.latency_p50 == pytest.approx(0.75)
    assert s.ttft_p50 == pytest.approx(0.1)
    assert s.itl_p50 is not None


def test_compare_gives_ratios_and_added_milliseconds() -> None:
    direct = cell_stats(
        [RoundWindow([row(i * 0.5, (i + 1) * 0.5, tokens=10) for i in range(10)], (0.0, 5.0))]
    )
    slower = cell_stats(
        [RoundWindow([row(i * 0.51, (i + 1) * 0.51, tokens=10) for i in range(10)], (0.0, 5.0))]
    )
    c = compare(slower, direct)
    assert c.latency_p50_ratio == pytest.approx(1.02)
    assert c.added_latency_p50_ms == pytest.approx(10.0)
    assert c.throughput_ratio == pytest.approx(0.5 / 0.51, rel=1e-3)
    assert c.throughput_ratio_range is not None
    assert c.ttft_p50_ratio is None  # non-streaming: no TTFT to compare


def test_median_range() -> None:
    assert median_range([None, None]) is None
    assert median_range([3.0, None, 1.0, 2.0]) == (2.0, 1.0, 3.0)


def test_plan_rotates_paths_and_bounds_every_run() -> None:
    urls = {p: f"http://{p}" for p in PATHS}
    cfg = OverheadConfig(concurrencies=(1, 64), rounds=3, duration=2.0)
    specs = plan(urls, cfg)
    assert len(specs) == 2 * 2 * 3 * len(PATHS)
    first_rounds = [s.path for s in specs[:9]]
    rotation = ["direct", "nginx", "relay", "nginx", "relay", "direct", "relay", "direct", "nginx"]
    assert first_rounds == rotation
    assert all(s.url == urls[s.path] for s in specs)
    assert all(s.max_requests >= 100 * s.concurrency and s.timeout > 0 for s in specs)


def test_aggregate_compares_every_path_with_direct_of_the_same_cell() -> None:
    runs = []
    for path, latency in (("direct", 0.5), ("nginx", 0.5), ("relay", 0.55)):
        rows = [row(i * latency, (i + 1) * latency, tokens=8) for i in range(12)]
        runs.append(
            {
                "spec": {"stream": False, "concurrency": 1, "path": path},
                "window": [0.0, 5.0],
                "samples": rows,
            }
        )
    cells = {c.path: c for c in aggregate(runs)}
    assert cells["direct"].vs_direct is None
    assert cells["nginx"].vs_direct is not None
    assert cells["nginx"].vs_direct.latency_p50_ratio == pytest.approx(1.0)
    relay = cells["relay"].vs_direct
    assert relay is not None and relay.added_latency_p50_ms == pytest.approx(50.0)


def test_direct_nginx_conf_swaps_the_relay_for_the_engine_only() -> None:
    template = (ROOT / "nginx" / "nginx.conf.template").read_text()
    conf = direct_nginx_conf(template, "node-1:30000", "Bearer k3y")
    assert "server node-1:30000 max_fails=1 fail_timeout=2s;\n        keepalive 256;" in conf
    # the engines' key, as the gateway's Nginx presents it (SGLang --api-key)
    assert 'proxy_set_header Authorization "Bearer k3y";' in conf
    assert "127.0.0.1:8001" not in conf and "nginx-relay-servers.conf" not in conf
    assert "nginx-backup-servers.conf" not in conf
    assert not re.search(r"@[A-Z][A-Z0-9_]*@", conf)  # every placeholder rendered
    # the rest of the gateway's proxying is unchanged
    for directive in ("proxy_buffering off;", "keepalive 256;", "proxy_http_version 1.1;"):
        assert directive in conf
    # one worker by default; the gateway's own count for its like-for-like row
    assert re.findall(r"^worker_processes \S+;", conf, flags=re.M) == ["worker_processes 1;"]
    two = direct_nginx_conf(template, "node-1:30000", "Bearer k3y", workers=2)
    assert re.findall(r"^worker_processes \S+;", two, flags=re.M) == ["worker_processes 2;"]
    with pytest.raises(ValueError):
        direct_nginx_conf("events {}\n", "node-1:30000", "Bearer k3y")


def test_pick_subnet_avoids_every_overlap() -> None:
    assert pick_subnet([]) == "10.213.0"
    assert pick_subnet(["10.213.0.0/24", "10.213.1.0/25"]) == "10.213.2"
    assert pick_subnet(["10.0.0.0/8"], prefix="172.31") == "172.31.0"
    with pytest.raises(RuntimeError):
        pick_subnet(["10.213.0.0/16"])


def test_in_flight_p99_counts_requests_that_hung_through_the_fault() -> None:
    records = [
        {"start": 0.0, "end": 1.0},  # done before the fault at 2.0
        {"start": 1.5, "end": 11.0},  # hung through it
        {"start": 3.0, "end": 3.5},  # started during it
        {"start": 12.0, "end": 12.5},  # after it healed at 10.0
    ]
    assert in_flight_p99(records, 2.0, 10.0) == pytest.approx(9.5 - (9.5 - 0.5) * 0.01)
    assert in_flight_p99(records[:1], 2.0, 10.0) is None


def test_trial_recovery_is_never_negative() -> None:
    result = summarise(
        Fault("f", "test fault", lambda s, n: None, lambda s, n: None, target_recovery=3.0),
        1,
        "a",
        "b",
        10.0,
        18.0,
        [
            RequestRecord(9.0, 9.5, False, True, None),
            RequestRecord(9.6, 10.1, False, True, "b"),
            RequestRecord(9.8, 10.2, False, False, "b", error="HTTP 502"),
            RequestRecord(9.9, 10.3, False, True, "b"),
        ],
        [],
    )
    assert result.recovered is not None and result.recovered < 0
    assert Trial("nginx-article", "f", 1, result).recovered == 0.0


def test_refused_tool_streams_are_counted_apart_from_failures() -> None:
    """The relay's retryable error for a tool call in flight is by design: not a failed
    stream; the tool streams open on the faulted primary are split into moved/refused."""

    def stream(start: float, end: float, ok: bool, tools: bool, refused: bool = False) -> Any:
        error = None if ok else "APIError: ... the stream cannot move ..."
        return RequestRecord(start, end, True, ok, "a", error=error, tools=tools, refused=refused)

    result = summarise(
        Fault("f", "test fault", lambda s, n: None, lambda s, n: None, target_recovery=3.0),
        1,
        "a",
        "b",
        10.0,
        18.0,
        [
            stream(9.0, 11.0, True, True),  # open at the fault, finished: moved
            stream(9.5, 10.5, False, True, refused=True),  # a call under way: refused
            stream(9.6, 10.6, False, False),  # a plain stream lost: a failure
            stream(8.0, 9.0, True, True),  # done before the fault
        ],
        [],
    )
    assert (result.stream_failed, result.stream_refused) == (1, 1)
    assert (result.tool_streams_moved, result.tool_streams_refused) == (1, 1)


def test_cpu_counters_of_both_cgroup_versions_are_read_in_seconds(tmp_path: Path) -> None:
    v1 = tmp_path / "cpuacct.usage"
    v1.write_text("2500000000\n")
    v2 = tmp_path / "cpu.stat"
    v2.write_text("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    assert read_cpu_seconds(str(v1)) == pytest.approx(2.5)
    assert read_cpu_seconds(str(v2)) == pytest.approx(1.5)
    assert read_cpu_seconds(str(tmp_path / "gone")) is None  # container removed


def test_cpu_meter_reports_cores_over_the_measured_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = tmp_path / "cpuacct.usage"
    counter.write_text("1000000000")
    clock = iter([100.0, 104.0])
    monkeypatch.setattr("bench.cpu.time.monotonic", lambda: next(clock))
    meter = CpuMeter({"engine": str(counter)})
    meter.start()
    counter.write_text("7000000000")  # 6 CPU seconds in 4 s of wall time
    cores = meter.cores()
    assert cores["engine"] == pytest.approx(1.5)
    assert {"host", "load generator"} <= cores.keys()


def test_aggregate_averages_cpu_per_cell_and_the_report_shows_it() -> None:
    runs = [
        {
            "spec": {"stream": True, "concurrency": 64, "path": "relay"},
            "window": [0.0, 5.0],
            "samples": [row(0.0, 1.0, ttft=0.1, last=0.9)],
            "cpu": cpu,
        }
        for cpu in ({"host": 1.8, "gateway": 0.4}, {"host": 2.0, "gateway": 0.6})
    ]
    (cell,) = aggregate(runs)
    assert cell.cpu == {"gateway": pytest.approx(0.5), "host": pytest.approx(1.9)}
    table = "\n".join(cpu_markdown([cell]))
    assert "| stream | 64 | relay | 1.90 | 0.50 |" in table


def test_warming_summary_compares_the_first_requests_with_steady_state() -> None:
    v = Variant("warming off", "0")
    v.steady = [WarmSample(float(i), 0.025, True, "sglang-01") for i in range(10)]
    v.after = [WarmSample(0.0, 0.33, True, "sglang-02") for _ in range(10)] + [
        WarmSample(1.0, 0.03, True, "sglang-02") for _ in range(40)
    ]
    v.after.append(WarmSample(2.0, None, False, None))
    s = v.summary()
    assert s["steady_ttft_p50_ms"] == pytest.approx(25.0)
    assert s["after_cold_requests"] == 10  # over 3 x the steady median
    assert s["after_failed"] == 1
    assert s["after_ttft_mean_ms"] == pytest.approx((10 * 330 + 40 * 30) / 50, abs=0.1)
    assert "| warming off |" in markdown([v])


def test_warming_requests_share_long_prefixes_and_vary_the_question() -> None:
    bodies = [warm_body(k).decode() for k in range(40)]
    assert len(set(bodies)) == 40
    assert bodies[0].split("Question")[0] == bodies[10].split("Question")[0]


def _capacity_run(
    path: str, rnd: int, events: int, cpu: dict[str, float], gaps: list[list[float]]
) -> dict[str, Any]:
    return {
        "spec": {"name": f"capacity/{path}/c64/r{rnd}", "path": path, "concurrency": 64},
        "window": [2.0, 12.0],
        "window_events": events,
        "metered_events": events + 100,
        "metered_seconds": 11.0,
        "cpu": cpu,
        "itl_ms": gaps,
        # [start, end, ok, warm, tokens, ttft, last_token, error]
        "samples": [[3.0, 5.0, True, False, 128, 0.05, 5.0, None]],
    }


def test_capacity_rates_ratios_and_cpu_per_event() -> None:
    from bench.capacity import aggregate, targets

    gw = "gateway (Nginx + relay)"
    runs = [
        _capacity_run("direct", 1, 30000, {gw: 0.05}, [[10.0, 99], [40.0, 1]]),
        _capacity_run("gateway", 1, 28500, {gw: 0.35}, [[10.0, 97], [50.0, 3]]),
        _capacity_run("direct", 2, 20000, {gw: 0.05}, [[10.0, 100]]),
        _capacity_run("gateway", 2, 20000, {gw: 0.25}, [[10.0, 100]]),
    ]
    rows = {r.path: r for r in aggregate(runs)}
    ours = rows["gateway"]
    assert ours.events_per_s == 2425.0  # (2850 + 2000) / 2
    assert ours.vs_direct_rounds == [0.95, 1.0]  # per round, against that round's direct
    assert ours.vs_direct == 0.975
    assert ours.itl_p99_ms == 50.0
    assert ours.ttft_p50_ms == 50.0
    # CPU seconds over events in the metered interval: (0.35 + 0.25) × 11 s / 48,700.
    assert ours.cpu_per_event_us == pytest.approx(135.5, abs=0.1)
    # Above idle: the container's CPU during the direct runs (0.05 cores) taken off.
    assert ours.marginal_us == pytest.approx((0.6 - 0.1) * 11 / 48700 * 1e6, abs=0.1)
    assert rows["direct"].vs_direct is None
    met = {t["what"]: t["met"] for t in targets(list(rows.values()), 2)}
    assert met == {"gateway (2 workers) events/s vs direct, 64 streams": True}


def test_capacity_cpu_bar_is_nginx_plus_router_of_the_same_run() -> None:
    """Each gateway is held to Nginx alone at its own Nginx's worker count + the router."""
    from bench.capacity import Row, targets

    def row(path: str, us: float | None) -> Row:
        return Row(64, path, 3000.0, 0.9, [0.9], 40.0, 40.0, 0.3, us, 0.0, us, 0)

    rows = [
        row("nginx", 33.0),
        row("nginx-nw", 38.0),
        row("router", 57.0),
        row("gateway-1w", 90.0),
        row("gateway", 96.0),
    ]
    bars = {t["what"]: t for t in targets(rows, 2, nginx_workers=2) if t["issue"] == 27}
    two = bars[
        "gateway (2 relay workers) CPU per event vs Nginx alone (2 workers) + router,"
        " 64 streams (µs)"
    ]
    one = bars[
        "gateway (1 relay worker) CPU per event vs Nginx alone (1 worker) + router, 64 streams (µs)"
    ]
    assert (two["target"], two["measured"], two["met"]) == ("<= 95.0 (38.0 + 57.0)", 96.0, False)
    assert (one["target"], one["measured"], one["met"]) == ("<= 90.0 (33.0 + 57.0)", 90.0, True)
    # A run without the N-worker Nginx row (before it existed): the one-worker Nginx.
    older = [t for t in targets([rows[0], *rows[2:]], 2, 2) if t["issue"] == 27]
    assert [t["target"] for t in older] == ["<= 90.0 (33.0 + 57.0)"] * 2
    # A gateway whose own Nginx runs one worker is held to the one-worker Nginx.
    one_nginx = [t["what"] for t in targets(rows, 2, nginx_workers=1) if t["issue"] == 27]
    assert one_nginx[0] == (
        "gateway (2 relay workers) CPU per event vs Nginx alone (1 worker) + router,"
        " 64 streams (µs)"
    )
    # Without a baseline measured in the run there is no bar to claim.
    assert not [t for t in targets(rows[2:], 2) if t["issue"] == 27]


def test_the_event_path_bench_times_the_relays_own_path() -> None:
    """`bench.relay_event_path` times what the relay does to an event: the client gets
    the chunk re-framed with the running usage cut off, and the first segment is kept."""
    from bench.relay_event_path import CHUNK, event_path

    one, client, state = event_path()
    one()
    one()
    client_chunk = CHUNK.replace(CHUNK[CHUNK.rfind(b',"usage":{') : -3], b"")
    assert client.written == 2 * len(b"%x\r\n%b\r\n" % (len(client_chunk), client_chunk))
    assert state.segment_raw == CHUNK * 2


def test_relay_local_refuses_a_run_whose_relay_process_exited() -> None:
    """A relay worker that exited mid-run (a zombie, or reaped) would count less CPU
    than it used: bench.relay_local refuses the run rather than print low figures."""
    import subprocess
    import sys

    from bench.relay_local import require_alive

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while (stat_fields(dead.pid) or ["?"])[0] != "Z":
            assert time.monotonic() < deadline, "the short process never exited"
            time.sleep(0.01)  # exited, not yet reaped: a zombie
        require_alive([live.pid], "relay")
        with pytest.raises(RuntimeError, match=str(dead.pid)):
            require_alive([live.pid, dead.pid], "relay")
        dead.wait(timeout=10)  # reaped: gone from /proc
        with pytest.raises(RuntimeError, match="exited during the relay run"):
            require_alive([dead.pid], "relay")
    finally:
        live.kill()
        live.wait(timeout=10)
