"""The fixed-rate engine's own timing, no hop: when it writes each event of a stream.

    PYTHONPATH=. python <this file>      (from the repository root of the code to test)

For `--timer loop` and `--timer kernel`: 100 streams of 8 events, one after another,
straight to `python -m bench.fixed_engine`; each event carries the engine's write time
(`time.monotonic_ns()`). Prints the p1 / p50 / p99 of the first event's write after
the client's send (ms) and of the gaps between consecutive writes (ms).
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time

from bench.gateway_bars import _one, listening
from tests.support.processes import free_port


def _q(xs: list[float]) -> list[float]:
    xs = sorted(xs)
    return [round(xs[int(q * len(xs))], 3) for q in (0.01, 0.5, 0.99)]


async def _streams(url: str) -> tuple[list[float], list[float]]:
    firsts: list[float] = []
    gaps: list[float] = []
    for _ in range(100):
        s = await _one(url, 8, True, 10.0)
        writes = [w for _, w in s.arrivals]
        firsts.append((writes[0] - s.sent_ns) / 1e6)
        gaps.extend((b - a) / 1e6 for a, b in itertools.pairwise(writes))
    return firsts, gaps


def main() -> None:
    for timer in ("loop", "kernel"):
        port = free_port()
        args = ["--port", str(port), "--forward", "http://127.0.0.1:1", "--timer", timer]
        proc = subprocess.Popen([sys.executable, "-m", "bench.fixed_engine", *args])
        try:
            deadline = time.monotonic() + 20
            while not listening(port):
                if time.monotonic() > deadline:
                    raise SystemExit("the engine did not listen")
                time.sleep(0.05)
            firsts, gaps = asyncio.run(_streams(f"http://127.0.0.1:{port}"))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        print(f"{timer:6}  first event p1/p50/p99 {_q(firsts)} ms  gaps {_q(gaps)} ms", flush=True)


if __name__ == "__main__":
    main()
