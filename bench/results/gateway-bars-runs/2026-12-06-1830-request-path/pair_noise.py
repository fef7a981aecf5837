"""What the light-latency pair statistic reads with nothing in between.

Pairs as bench/gateway_bars.py's light-latency (1 slot, 240 pairs, 32-event streams,
the order alternating), A always straight to the fixed-rate engine, B by:

  null-0    straight to the engine too, at the same instant as A;
  null-1ms  straight to the engine, 1 ms after A (about when the relay's request
            reaches the engine, the decomposition beside this file);
  null-2ms  straight to the engine, 2 ms after A;
  relay     through the relay (2 workers), at the same instant as A.

Each stream's TTFT counts from its own send, so B's delay is not in it. Per kind: the
p50 and p99 of B − A within each pair (the bench's statistic), and p99(B) − p99(A)
over the same pairs (the difference of the two distributions' p99s).

From the repository root, under the Docker lock:
    PYTHONPATH=. python <this file> OUT.json
"""

# ruff: noqa: ASYNC240  (set-up and teardown of local processes, as bench/gateway_bars.py)
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import gateway_bars as gb
from tests.support.cluster import local_cluster
from tests.support.processes import free_port, redis_server

PAIRS = 240
KINDS = (("null-0", False, 0.0), ("null-1ms", False, 0.001), ("relay", True, 0.0),
         ("null-2ms", False, 0.002))  # fmt: skip


async def _delayed(url: str, delay: float) -> gb._Stream:
    await asyncio.sleep(delay)
    return await gb._one(url, 32, True, 30.0)


async def pairs(a: str, b: str, delay: float) -> list[tuple[float, float]]:
    """(A's TTFT, B's TTFT) per pair, ms."""
    out = []
    for k in range(PAIRS):
        if k % 2 == 0:
            sa, sb = await asyncio.gather(_delayed(a, 0.0), _delayed(b, delay))
        else:
            sb, sa = await asyncio.gather(_delayed(b, 0.0), _delayed(a, delay))
        if sa.arrivals and sb.arrivals:
            out.append(
                ((sa.arrivals[0][0] - sa.sent_ns) / 1e6, (sb.arrivals[0][0] - sb.sent_ns) / 1e6)
            )
    return out


def _pct(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(kind: str, rows: list[tuple[float, float]]) -> dict[str, Any]:
    a, b = [r[0] for r in rows], [r[1] for r in rows]
    diff = [y - x for x, y in rows]
    return {
        "kind": kind,
        "pairs": len(rows),
        "pairwise_p50_ms": round(_pct(diff, 0.5), 3),
        "pairwise_p99_ms": round(_pct(diff, 0.99), 3),
        "p99_b_minus_p99_a_ms": round(_pct(b, 0.99) - _pct(a, 0.99), 3),
        "p50_b_minus_p50_a_ms": round(_pct(b, 0.5) - _pct(a, 0.5), 3),
        "ttft_ms": rows,
    }


async def _client(plan: dict[str, Any], timeout: float) -> list[list[float]]:
    """This file's `client` in its own process, as gateway_bars runs its clients."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "plan.json").write_text(json.dumps(plan))
        args = ["client", f"{tmp}/plan.json", f"{tmp}/out.json"]
        proc = await asyncio.create_subprocess_exec(sys.executable, __file__, *args)
        if await asyncio.wait_for(proc.wait(), timeout) != 0:
            raise RuntimeError(f"client failed: {plan}")
        rows: list[list[float]] = json.loads(Path(tmp, "out.json").read_text())
        return rows


async def measure() -> list[dict[str, Any]]:
    fronts = {name: free_port() for name in gb.NAMES}
    advertise = {name: f"http://127.0.0.1:{p}" for name, p in fronts.items()}
    sim_env = {"SIM_ITL": str(gb.ITL), "SIM_TTFT_BASE": str(gb.TTFT)}
    results = []
    with redis_server() as redis:
        async with local_cluster(
            redis, gb.NAMES, relay=False, sim_env=sim_env, advertise=advertise
        ) as cluster:
            direct = advertise[await cluster.wait_ready()]
            async with gb._fixed_engines(cluster, fronts), gb._relay(cluster, 2) as (url, _):
                await gb._wait_relay_routes(url, 30.0)
                for kind, through_relay, delay in KINDS:
                    plan: dict[str, Any] = {
                        "a": direct,
                        "b": url if through_relay else direct,
                        "delay": delay,
                    }
                    res = await _client(plan, 300.0)
                    results.append(summary(kind, [(x, y) for x, y in res]))
                    print({k: v for k, v in results[-1].items() if k != "ttft_ms"}, flush=True)
    return results


if __name__ == "__main__":
    if sys.argv[1] == "client":
        plan = json.loads(Path(sys.argv[2]).read_text())
        rows = asyncio.run(pairs(plan["a"], plan["b"], plan["delay"]))
        Path(sys.argv[3]).write_text(json.dumps(rows))
    else:
        Path(sys.argv[1]).write_text(json.dumps(asyncio.run(measure()), indent=1))
