"""The gateway bars' own instruments: the fixed-rate engine and the paired client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import gateway_bars
from bench.cpu import processes_cpu_seconds
from bench.cpu_cap import CapUnavailable, CpuCap
from bench.fixed_engine import KernelTimers
from bench.gateway_bars import Bars, BarsConfig, _one, _open_loop, _pairs, quantiles_added, targets
from tests.support.processes import free_port, wait_until


@pytest.fixture
def engine() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.fixed_engine",
            "--port",
            str(port),
            "--forward",
            f"http://127.0.0.1:{free_port()}",
            "--ttft",
            "0.02",
            "--itl",
            "0.01",
        ]
    )
    try:
        wait_until(lambda: gateway_bars.listening(port), timeout=20, what="fixed engine to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fixed_engine_streams_timestamped_events_at_its_rate(engine: str) -> None:
    s = asyncio.run(_one(engine, 5, True, 10.0))
    assert s.status == 200
    assert len(s.arrivals) == 5
    # Event k is written on the stream's own clock: never before 20 ms + k × 10 ms
    # after the request (a late one, on a loaded machine, does not delay the next);
    # the first on a kernel timer, the rest less libuv's own granularity (1 ms).
    writes = [(w - s.sent_ns) / 1e6 for _, w in s.arrivals]
    assert writes[0] >= 20.0, writes
    assert all(w >= 20.0 + k * 10.0 - 1.0 for k, w in enumerate(writes)), writes
    assert writes[-1] < 1000.0, writes
    # Each event arrives after the engine wrote it.
    assert all(arrival >= write for arrival, write in s.arrivals)


def test_kernel_timers_fire_in_deadline_order_and_never_early() -> None:
    async def run() -> list[tuple[str, int, int]]:
        timers = KernelTimers(asyncio.get_running_loop())
        fired: list[tuple[str, int, int]] = []
        done = asyncio.Event()
        now = time.monotonic_ns()
        # Given out of deadline order, one already past.
        plan = {
            "3ms": now + 3_000_000,
            "1ms": now + 1_000_000,
            "past": now - 5_000_000,
            "2ms": now + 2_000_000,
        }

        def call(label: str, when: int) -> None:
            fired.append((label, when, time.monotonic_ns()))
            if len(fired) == len(plan):
                done.set()

        for label, when in plan.items():
            timers.call_at(when, lambda label=label, when=when: call(label, when))
        await asyncio.wait_for(done.wait(), 5.0)
        timers.close()
        return fired

    fired = asyncio.run(run())
    assert [label for label, _, _ in fired] == ["past", "1ms", "2ms", "3ms"]
    assert all(at >= when for _, when, at in fired), fired


def test_a_path_compared_with_itself_adds_next_to_nothing(engine: str) -> None:
    out = asyncio.run(
        _pairs(
            {
                "direct": engine,
                "relay": engine,
                "slots": 1,
                "seconds": 0.3,
                "pairs": 99,
                "tokens": 4,
            }
        )
    )
    assert out["pairs"] >= 1 and out["failed_pairs"] == 0
    assert out["itl_added_ms"]["n"] == out["pairs"] * 3
    assert out["event_delay_added_ms"]["n"] == out["pairs"] * 4
    # The same engine both ways: any difference is the client's own noise.
    assert abs(out["ttft_added_ms"]["p50"]) < 15.0
    # Every pair's request path is timed by the engine's clock, and the same path both
    # ways adds next to nothing (no libuv timer rounding in it).
    assert out["path_added_ms"]["n"] == out["pairs"]
    assert abs(out["path_added_ms"]["p50"]) < 5.0
    assert abs(out["ttft_quantiles_added_ms"]["p50"]) < 15.0


def test_nginx_alone_is_a_hop_in_front_of_the_engine_and_goes_away(engine: str) -> None:
    # The light-latency phase's reference: the gateway's own Nginx configuration, the
    # relay swapped for the engine, run by the host's nginx (the test tools install it).
    async def through_nginx() -> tuple[Any, Bars, str]:
        bars = Bars()
        async with gateway_bars._nginx_alone(engine, bars) as url:
            assert url is not None, bars.nginx_unavailable
            return await _one(url, 3, True, 10.0), bars, url

    s, bars, url = asyncio.run(through_nginx())
    assert s.status == 200 and len(s.arrivals) == 3
    assert bars.nginx_unavailable == ""
    port = int(url.rsplit(":", 1)[1])
    assert not gateway_bars.listening(port)  # stopped when the phase is done


def test_nginx_alone_says_why_it_is_missing(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_bars.shutil, "which", lambda name: None)

    async def run() -> tuple[str | None, Bars]:
        bars = Bars()
        async with gateway_bars._nginx_alone(engine, bars) as url:
            return url, bars

    url, bars = asyncio.run(run())
    assert url is None and "no nginx on PATH" in bars.nginx_unavailable
    plan = {"direct": engine, "relay": engine, "slots": 1, "seconds": 0.3, "pairs": 3, "tokens": 2}
    bars.latency.append(asyncio.run(_pairs(plan)))
    text = gateway_bars.markdown(bars, BarsConfig(), "run")
    assert "Nginx alone, the reference hop: not measured (no nginx on PATH" in text


def test_quantiles_added_is_what_the_relay_adds_to_the_distribution() -> None:
    # The relay 1 ms slower than direct at every quantile, each pair's two requests
    # meeting different engine jitter (0-4 ms, shuffled): the distribution moved by
    # exactly 1 ms, while the differences within pairs spread far wider.
    direct = [20.0 + (k % 5) for k in range(200)]
    relay = [21.0 + ((k * 3) % 5) for k in range(200)]
    added = quantiles_added(relay, direct)
    assert added == {"p50": 1.0, "p99": 1.0}
    pairwise = sorted(r - d for r, d in zip(relay, direct, strict=True))
    assert pairwise[int(0.99 * len(pairwise))] >= 3.0
    assert quantiles_added([], []) == {"p50": None, "p99": None}


def test_open_loop_counts_what_arrives_in_the_window(engine: str) -> None:
    out = asyncio.run(
        _open_loop(
            {
                "url": engine,
                "offered": 400,
                "tokens": 4,
                "warmup": 0.2,
                "seconds": 1.0,
                "pids": {"engine": []},
            }
        )
    )
    assert out["failed"] == 0
    assert out["streams_started"] >= 100
    # 100 streams/s × 4 events: about 400 events/s once the first streams have ended.
    assert 100 < out["delivered_events_per_s"] < 600
    json.dumps(out)


def test_scaling_bar_is_the_ratio_of_saturation_rates() -> None:
    def rows(*rates: float) -> list[dict[str, float]]:
        return [{"delivered_events_per_s": r} for r in rates]

    bars = Bars(scaling={1: rows(4000, 9000, 8800), 2: rows(4000, 8000, 15000)})
    (bar,) = targets(bars)
    assert bar["measured"] == pytest.approx(15000 / 9000, abs=1e-3)
    assert bar["met"] is False
    assert gateway_bars.saturation([]) == 0.0
    assert BarsConfig().offered == tuple(sorted(BarsConfig().offered))


def test_pairs_stop_at_the_count_asked_for(engine: str) -> None:
    # 3 slots and a count of 4: the slots stop once 4 pairs are in, long before the time.
    out = asyncio.run(
        _pairs(
            {"direct": engine, "relay": engine, "slots": 3, "seconds": 30, "pairs": 4, "tokens": 2}
        )
    )
    assert 4 <= out["pairs"] + out["failed_pairs"] <= 4 + 2  # the slots' pairs in flight


def test_a_capped_process_gets_no_more_cpu_than_its_cap() -> None:
    try:
        cap = CpuCap(f"sglang-ha-test-{os.getpid()}", 0.2)
    except CapUnavailable as exc:
        pytest.skip(f"no cgroup CPU controller to write here: {exc}")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        try:
            cap.add(spin.pid)
        except CapUnavailable as exc:
            pytest.skip(f"no cgroup to move a process into here: {exc}")
        before, t0 = processes_cpu_seconds([spin.pid]), time.monotonic()
        time.sleep(1.5)  # a CPU measurement's window, not a wait for a condition
        used = (processes_cpu_seconds([spin.pid]) - before) / (time.monotonic() - t0)
    finally:
        spin.kill()
        spin.wait()
        cap.remove()
    # A spinning process uncapped takes a whole core; capped, a fifth (clock ticks
    # are 10 ms, so allow for them).
    assert used < 0.3, used
    assert not cap.path.exists()


def test_the_whole_gateway_is_its_own_nginx_config_in_front_of_the_relay_sockets(
    engine: str, tmp_path: Path
) -> None:
    # No relay worker listens on the sockets here: the gateway's Nginx finds none and
    # takes its last resort, the engines, as in a gateway whose relay is down.
    seeds = [f"sglang-01={engine}=http://127.0.0.1:9"]
    roots: list[Path] = []

    def conf(listen: str, status: str, root: Path) -> str:
        roots.append(root)
        return gateway_bars.host_gateway_conf(seeds, str(tmp_path), 2, listen, status, root)

    async def through_gateway() -> tuple[Any, str, str]:
        async with gateway_bars._host_nginx(conf, pytest.fail) as url:
            assert url is not None
            servers = (roots[0] / "nginx-relay-servers.conf").read_text()
            return await _one(url, 3, True, 10.0), servers, url

    s, servers, url = asyncio.run(through_gateway())
    assert s.status == 200 and len(s.arrivals) == 3
    assert f"server unix:{tmp_path}/relay-0.sock" in servers
    assert f"server unix:{tmp_path}/relay-1.sock" in servers
    assert not gateway_bars.listening(int(url.rsplit(":", 1)[1]))


def test_the_latency_bar_is_read_on_the_whole_gateway_where_it_ran(engine: str) -> None:
    plan = {"direct": engine, "relay": engine, "slots": 1, "seconds": 0.3, "pairs": 3, "tokens": 2}
    bars = Bars()
    bars.latency.append(asyncio.run(_pairs(plan)))
    assert targets(bars)[0]["what"].startswith("relay − direct TTFT p50")
    bars.latency_gateway.append(asyncio.run(_pairs(plan)))
    latency = [t["what"] for t in targets(bars)]
    assert latency and all(w.startswith("gateway") for w in latency)
    assert "**The same pairs through the whole gateway**" in gateway_bars.markdown(
        bars, BarsConfig(), "run"
    )
