"""The light-latency pairs against three second paths in one run, to find the host's floor.

For each slot count (1, 2, 4) and 240 pairs, each pair sends one stream straight to the
fixed-rate engine and one by a second path at the same instant (bench/gateway_bars.py's
method, unchanged):

  null   the second stream also goes straight to the engine: what the pair method
         itself reads on this host when nothing is in between (its noise floor);
  nginx  Nginx alone as a plain streaming proxy to the same engine (proxy_buffering
         off, HTTP/1.1, keep-alive upstream, 2 workers): a C proxy's added latency;
  relay  the relay, 2 workers, as make bench-gateway measures it.

The three interleave per slot count (null, nginx, relay, ...), so drift on the shared
host falls on all three alike. From the repository root, under the Docker lock:
    PYTHONPATH=. python <this file> [pairs]
"""

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import gateway_bars as gb
from tests.support.cluster import local_cluster
from tests.support.processes import free_port, redis_server

PAIRS = int(sys.argv[1]) if len(sys.argv) > 1 else 240

NGINX_CONF = """
daemon off;
worker_processes 2;
user root;
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    tcp_nodelay on;
    upstream engine {{ server 127.0.0.1:{engine}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering on;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(engine_port: int):
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "nginx.conf").write_text(
            NGINX_CONF.format(tmp=tmp, engine=engine_port, port=port)
        )
        proc = subprocess.Popen(["nginx", "-p", tmp, "-c", f"{tmp}/nginx.conf"])
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)


async def main() -> list[dict[str, object]]:
    fronts = {name: free_port() for name in gb.NAMES}
    advertise = {name: f"http://127.0.0.1:{p}" for name, p in fronts.items()}
    sim_env = {"SIM_ITL": str(gb.ITL), "SIM_TTFT_BASE": str(gb.TTFT)}
    out: list[dict[str, object]] = []
    with redis_server() as redis:
        async with local_cluster(
            redis, gb.NAMES, relay=False, sim_env=sim_env, advertise=advertise
        ) as cluster:
            primary = await cluster.wait_ready()
            direct = advertise[primary]
            async with (
                gb._fixed_engines(cluster, fronts),
                gb._relay(cluster, 2) as (relay_url, _),
            ):
                await gb._wait_relay_routes(relay_url, 30.0)
                with nginx(fronts[primary]) as nginx_url:
                    await gb._wait_relay_routes(nginx_url, 30.0)
                    for slots in (1, 2, 4):
                        for name, second in (
                            ("null", direct),
                            ("nginx", nginx_url),
                            ("relay", relay_url),
                        ):
                            plan = {
                                "mode": "pairs",
                                "direct": direct,
                                "relay": second,
                                "slots": slots,
                                "seconds": 120.0,
                                "pairs": PAIRS,
                                "tokens": 32,
                            }
                            res = await gb._run_client(plan, 240.0)
                            res["second"] = name
                            out.append(res)
                            t, i, p = (
                                res["ttft_added_ms"],
                                res["itl_added_ms"],
                                res["path_added_ms"],
                            )
                            print(
                                f"{name:5} slots {slots} pairs {res['pairs']}"
                                f" ttft p50 {t['p50']:+.3f} p99 {t['p99']:+.3f}"
                                f" | itl p50 {i['p50']:+.3f} p99 {i['p99']:+.3f}"
                                f" | path p50 {p['p50']:+.3f} p99 {p['p99']:+.3f}",
                                flush=True,
                            )
    return out


result = asyncio.run(main())
Path(sys.argv[2] if len(sys.argv) > 2 else "floor.json").write_text(json.dumps(result, indent=1))
