"""Two relay workers of a pool of two admit a burst of retries while the agents'
reports of their engines come at their own times (2026-12-07; what the CPU stack's
pool did under a CPU burner: 70 long streams admitted in 0.6 s where 16 fit).

The real WaitEstimator, Admission and routing (`_Tries`) of each worker, with a fake
clock: 8 slots per engine, 11 s per 2,000-token stream, bound 10 s; 16 streams began
together 0.3 s in, split over the two workers (`split`: the share of worker 0);
2.4 s in, 260 retries arrive 3 ms apart at a random worker; each engine's agent
reports running/queued every `lag` seconds, the two out of step. Printed: the
requests admitted per seed. 16 fit (a second wave of 8 per node).

    .venv/bin/python bench/results/shedding-runs/2026-12-07-pool-admission-sim.py
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from ha_agent.gateway.admission import gate
from tests.support.fakes import FakeClock
from tests.unit.test_admission_wait import _Stream, admit_and_route, pool_worker, report

BODY = {"text": "Tell a very long story.", "sampling_params": {"max_new_tokens": 2000}}
LIGHT = {"text": "hi", "sampling_params": {"max_new_tokens": 16}}


async def burst(seed: int, split: float, lag: float, light_every: int) -> int:
    rnd = random.Random(seed)
    clock = FakeClock()
    gate.time.monotonic = clock
    workers = [pool_worker(Path(tempfile.mkdtemp()), clock) for _ in range(2)]
    engine = {"a": 0, "b": 0}
    t0 = clock()
    for i in range(16):
        node = "ab"[i % 2]
        topo = workers[0 if rnd.random() < split else 1].topology
        topo.nodes[node].inflight.add(_Stream(t0, t0 + 0.3))
        engine[node] += 1

    def publish(node: str) -> None:
        for worker in workers:
            report(worker.topology, node, min(8, engine[node]), max(0, engine[node] - 8))

    for node in ("a", "b"):
        publish(node)
    clock.advance(2.4)
    last = {"a": clock() - lag + 0.02, "b": clock() - lag / 2}  # a reports first
    admitted = 0
    for k in range(260):
        clock.advance(0.003)
        for node in ("a", "b"):
            if clock() - last[node] >= lag:
                publish(node)
                last[node] = clock()
        body = LIGHT if light_every and k % light_every == 0 else BODY
        chosen = await admit_and_route(workers[rnd.randrange(2)], body)
        if chosen is not None:
            engine[chosen.name] += 1
            admitted += 1
    return admitted


def main() -> None:
    for split in (0.5, 0.75):
        for lag in (0.5, 1.5):
            for light_every in (0, 10):
                admitted = [asyncio.run(burst(s, split, lag, light_every)) for s in range(5)]
                print(f"split {split} lag {lag} light_every {light_every}: admitted {admitted}")


if __name__ == "__main__":
    main()
