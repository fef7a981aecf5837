"""The light-latency pairs through three hops in one run: what a Python hop costs at least.

For each slot count (1, 2, 4), 240 pairs each (bench/gateway_bars.py's method and
client, unchanged), the second stream of each pair by one of three hops in turn:

  forwarder  forwarder.py, 2 processes on one SO_REUSEPORT port: uvloop, no framework,
             no checks, spare engine connections (the least a Python hop does);
  nginx      Nginx alone, as the light-latency phase runs it (the gateway's own
             configuration, the relay swapped for the engine, one worker);
  relay      the relay, 2 workers, as the light-latency phase runs it.

From the repository root, under the Docker lock, nothing else running:
    PYTHONPATH=. python <this file> OUT.json   (run as run.py; renamed after, for mypy)
"""

# ruff: noqa: ASYNC220, ASYNC240  (set-up of local processes, one file written at the end)
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import gateway_bars as gb
from tests.support.cluster import local_cluster
from tests.support.processes import free_port, redis_server

HERE = Path(__file__).resolve().parent


async def main(out: Path) -> None:
    fronts = {name: free_port() for name in gb.NAMES}
    advertise = {name: f"http://127.0.0.1:{p}" for name, p in fronts.items()}
    sim_env = {"SIM_ITL": str(gb.ITL), "SIM_TTFT_BASE": str(gb.TTFT)}
    results: dict[str, list[dict[str, Any]]] = {"forwarder": [], "nginx": [], "relay": []}
    with redis_server() as redis:
        async with local_cluster(
            redis, gb.NAMES, relay=False, sim_env=sim_env, advertise=advertise
        ) as cluster:
            primary = await cluster.wait_ready()
            direct = advertise[primary]
            engine_port = fronts[primary]
            bars = gb.Bars()
            async with (
                gb._fixed_engines(cluster, fronts),
                gb._relay(cluster, 2) as (relay, _),
                gb._nginx_alone(direct, bars) as nginx,
            ):
                assert nginx is not None, bars.nginx_unavailable
                port = free_port()
                fwd = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "forwarder.py"),
                            str(port),
                            "127.0.0.1",
                            str(engine_port),
                        ]
                    )
                    for _ in range(2)
                ]
                try:
                    forwarder = f"http://127.0.0.1:{port}"
                    await gb._wait_relay_routes(forwarder, 30.0)
                    await gb._wait_relay_routes(relay, 30.0)
                    for slots in (1, 2, 4):
                        for name, hop in (
                            ("forwarder", forwarder),
                            ("nginx", nginx),
                            ("relay", relay),
                        ):
                            plan = {
                                "mode": "pairs",
                                "direct": direct,
                                "relay": hop,
                                "slots": slots,
                                "seconds": 120.0,
                                "pairs": 240,
                                "tokens": 32,
                            }
                            res = await gb._run_client(plan, 240.0)
                            results[name].append(res)
                            p, t = res["path_added_ms"], res["ttft_added_ms"]
                            q = res["ttft_quantiles_added_ms"]
                            print(
                                f"{name:9} {slots} slots: path+first p50 {p['p50']:+.3f}"
                                f" p99 {p['p99']:+.3f}; TTFT within pairs p50 {t['p50']:+.3f}"
                                f" p99 {t['p99']:+.3f}; p50-p50 {q['p50']:+.3f}"
                                f" p99-p99 {q['p99']:+.3f} ms",
                                flush=True,
                            )
                finally:
                    await gb._stop(fwd)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
