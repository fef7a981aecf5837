"""Inline marks for marks.patch (a measurement, not shipped): copied to
ha_agent/_stamp.py while the patch is applied. Each request's marks, from the
handler to the write to the engine; at exit, MARK_OUT.<pid> gets the time between
consecutive marks, µs."""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import time

_ns = time.perf_counter_ns
_cur: list[tuple[str, int]] = []
_rows: list[list[tuple[str, int]]] = []


def mark(name: str) -> None:
    _cur.append((name, _ns()))


def reset() -> None:
    _cur.clear()
    mark("handle")


def flush() -> None:
    if len(_cur) > 1:
        _rows.append(list(_cur))
    _cur.clear()


def _dump() -> None:
    out = os.environ.get("MARK_OUT")
    if not out or not _rows:
        return
    gaps: dict[str, list[int]] = collections.defaultdict(list)
    for row in _rows:
        for (a, ta), (b, tb) in itertools.pairwise(row):
            gaps[f"{a}->{b}"].append(tb - ta)
    with open(out + f".{os.getpid()}", "w") as f:
        for k, xs in gaps.items():
            s = sorted(xs)
            n = len(s)
            f.write(
                f"{k:<34} n {n:5d} p50 {s[n // 2] / 1e3:7.1f} p90 {s[int(n * 0.9)] / 1e3:7.1f}\n"
            )


atexit.register(_dump)
