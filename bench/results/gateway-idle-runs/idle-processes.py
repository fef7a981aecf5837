"""The idle CPU of each process in the two gateway containers (/proc/PID/stat).

    PYTHONPATH=. python bench/results/gateway-idle-runs/idle-processes.py   (under the Docker lock)

Keyed by command line: processes with the same one (the relay workers) show as one.
"""

import time

from bench.stacks import OurStack, our_stack

_LIST = (
    "for p in /proc/[0-9]*; do"
    ' s=$(cat $p/stat 2>/dev/null | sed "s/.*) //" | cut -d" " -f12,13);'
    ' echo "$s $(tr "\\0" " " < $p/cmdline | cut -c1-90)"; done'
)
GATEWAYS = ("gateway", "gateway-1w")


def ticks(ours: OurStack, service: str) -> dict[str, int]:
    """utime + stime (clock ticks) by command line."""
    out = ours.stack.container(service).exec_run(["sh", "-c", _LIST]).output.decode()
    found = {}
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0].isdigit():
            found[parts[2]] = int(parts[0]) + int(parts[1])
    return found


with our_stack() as ours:
    time.sleep(5)  # the stack settles after start
    before, t0 = {s: ticks(ours, s) for s in GATEWAYS}, time.monotonic()
    time.sleep(40)  # the measurement window
    after, t1 = {s: ticks(ours, s) for s in GATEWAYS}, time.monotonic()
    for service in GATEWAYS:
        print("==", service)
        for command, n in after[service].items():
            print(round((n - before[service].get(command, 0)) / 100 / (t1 - t0), 4), command)
