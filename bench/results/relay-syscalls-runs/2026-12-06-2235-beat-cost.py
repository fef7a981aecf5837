"""The relay worker heartbeat's CPU, before (a loop around `wait_for`) and after (a timer
callback) commit of 2026-12-06 22:35: 5 s of beats every 1 ms on uvloop, twice each.

    .venv/bin/python bench/results/relay-syscalls-runs/2026-12-06-2235-beat-cost.py
"""

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import uvloop


async def old_beat(d, index, interval, stop):
    path = d / str(index)
    path.write_text("1")
    while not stop.is_set():
        with contextlib.suppress(OSError):
            os.utime(path)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def run(fn):
    from ha_agent.gateway.edge.watchdog import beat

    f = beat if fn == "new" else old_beat
    with tempfile.TemporaryDirectory() as t:
        stop = asyncio.Event()
        c0 = time.process_time()
        task = asyncio.ensure_future(f(Path(t), 0, 0.001, stop))
        await asyncio.sleep(5)
        stop.set()
        await task
        return time.process_time() - c0


uvloop.install()
for fn in ("old", "new", "old", "new"):
    print(fn, round(asyncio.run(run(fn)) * 1000, 1), "ms CPU for 5 s of beats every 1 ms")
