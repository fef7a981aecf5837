"""The light-latency phase at the given slot counts and pairs, its p99s and worst pairs.

From the repository root, under the Docker lock (the log beside it has the loop):
    HA_POLL_INTERVAL=60 PYTHONPATH=. python <this file> 2 240
"""

import sys

from bench import gateway_bars as gb

cfg = gb.BarsConfig(
    slots=tuple(int(x) for x in sys.argv[1].split(",")), latency_pairs=int(sys.argv[2])
)
bars = gb.run(cfg, {"light-latency"})
for r in bars.latency:
    t, p = r["ttft_added_ms"], r["path_added_ms"]
    print(
        r["slots"],
        r["pairs"],
        f"ttft p50 {t['p50']:.3f} p99 {t['p99']:.3f}",
        f"path p50 {p['p50']:.3f} p99 {p['p99']:.3f}",
        "worst",
        [round(x, 2) for x in p["worst"]],
    )
