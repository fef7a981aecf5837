"""Where the relay's added time on the request path goes, at light load.

bench/gateway_bars.py's light-latency pairs (one stream straight to the fixed-rate
engine, one through the relay, at the same instant; 1 slot, 270 pairs), with the
relay's two workers run as relay_timed.py, which stamps each request's moments. Per
request, on the host's one monotonic clock: the client's write (`sent`), the relay's
first read of it (`data`), the relay's write to the engine (`send`), and the engine's
read of its last byte (`received`); the direct stream's `sent` → `received` beside it.

From the repository root, under the Docker lock:
    PYTHONPATH=. python <this folder>/run.py OUT_DIR
"""

from __future__ import annotations

import asyncio
import bisect
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import gateway_bars as gb
from tests.support.cluster import local_cluster
from tests.support.processes import free_port, redis_server

HERE = Path(__file__).parent
PAIRS = 270
_Popen = subprocess.Popen


class _TimedPopen(_Popen):
    """gateway_bars starts the relay as `python -m ha_agent.gateway`: timed instead."""

    def __init__(self, cmd: list[str], *args: Any, **kwargs: Any) -> None:
        if cmd[1:] == ["-m", "ha_agent.gateway"]:
            cmd = [cmd[0], str(HERE / "relay_timed.py")]
        super().__init__(cmd, *args, **kwargs)


async def pairs(direct: str, relay: str) -> list[dict[str, int]]:
    rows: list[dict[str, int]] = []
    k = 0
    deadline = time.monotonic() + 120
    while len(rows) < PAIRS and time.monotonic() < deadline:
        order = ("direct", "relay") if k % 2 == 0 else ("relay", "direct")
        k += 1
        urls = {"direct": direct, "relay": relay}
        got = await asyncio.gather(*(gb._one(urls[o], 32, True, 30.0) for o in order))
        by = dict(zip(order, got, strict=True))
        d, r = by["direct"], by["relay"]
        if r.received_ns and d.received_ns:
            rows.append(
                {
                    "sent": r.sent_ns,
                    "received": r.received_ns,
                    "direct_sent": d.sent_ns,
                    "direct_received": d.received_ns,
                }
            )
    return rows


def client(direct: str, relay: str, out: str) -> None:
    Path(out).write_text(json.dumps(asyncio.run(pairs(direct, relay))))


async def measure(out: Path) -> None:
    fronts = {name: free_port() for name in gb.NAMES}
    advertise = {name: f"http://127.0.0.1:{p}" for name, p in fronts.items()}
    sim_env = {"SIM_ITL": str(gb.ITL), "SIM_TTFT_BASE": str(gb.TTFT)}
    with redis_server() as redis:
        async with local_cluster(
            redis, gb.NAMES, relay=False, sim_env=sim_env, advertise=advertise
        ) as cluster:
            primary = await cluster.wait_ready()
            async with (
                gb._fixed_engines(cluster, fronts),
                gb._relay(cluster, 2) as (url, _),
            ):
                await gb._wait_relay_routes(url, 30.0)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "client", advertise[primary], url,
                    str(out / "pairs.json"),
                )  # fmt: skip
                await asyncio.wait_for(proc.wait(), 300)


def pct(xs: list[int]) -> str:
    xs = sorted(xs)
    n = len(xs)
    return (
        f"n {n}  p50 {xs[n // 2] / 1e3:6.0f}  p90 {xs[int(n * 0.9)] / 1e3:6.0f}"
        f"  p99 {xs[int(n * 0.99)] / 1e3:6.0f}  max {xs[-1] / 1e3:6.0f} µs"
    )


def report(out: Path) -> str:
    clients = json.loads((out / "pairs.json").read_text())
    relays = [
        r for f in glob.glob(str(out / "relay-*.json")) for r in json.loads(Path(f).read_text())
    ]
    sent = sorted(clients, key=lambda c: c["sent"])
    keys = [c["sent"] for c in sent]
    matched = []  # each relay request with the client stream that sent it (the last before)
    for r in relays:
        i = bisect.bisect_right(keys, r.get("data", 0)) - 1
        if "send" in r and i >= 0 and r["data"] - keys[i] < 50_000_000:
            matched.append((r, sent[i]))
    lines = [
        ("client write → relay reads it", [r["data"] - c["sent"] for r, c in matched]),
        ("relay reads it → relay writes to engine", [r["send"] - r["data"] for r, c in matched]),
        ("relay writes → engine reads it", [c["received"] - r["send"] for r, c in matched]),
        ("through the relay, in all", [c["received"] - c["sent"] for r, c in matched]),
        ("straight to the engine", [c["direct_received"] - c["direct_sent"] for r, c in matched]),
    ]
    return "\n".join(f"{name:42} {pct(xs)}" for name, xs in lines)


if __name__ == "__main__":
    if sys.argv[1] == "client":
        client(*sys.argv[2:5])
    else:
        folder = Path(sys.argv[1])
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.Popen = _TimedPopen  # type: ignore[assignment,misc]
        os.environ["TIMED_OUT"] = str(folder.resolve())
        asyncio.run(measure(folder))
        print(report(folder))
