"""The idle CPU of every container of the capacity phase's stack, by cgroup counter.

PYTHONPATH=. python bench/results/gateway-idle-runs/idle-cgroups.py   (under the Docker lock)
"""

import time

from bench.cpu import read_cpu_seconds
from bench.stacks import our_stack

with our_stack() as ours:
    files = ours.cpu_files()
    time.sleep(5)  # the stack settles after start
    before, t0 = {k: read_cpu_seconds(v) for k, v in files.items()}, time.monotonic()
    time.sleep(40)  # the measurement window
    after, t1 = {k: read_cpu_seconds(v) for k, v in files.items()}, time.monotonic()
    for name in files:
        b, a = before[name], after[name]
        if a is not None and b is not None:
            print(name, round((a - b) / (t1 - t0), 4))
