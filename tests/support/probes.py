"""New requests at a steady pace, whatever a closed-loop load's clients are stuck on.

A closed-loop client that waits on a frozen component sends nothing new, so "requests
that start after the fault" may be none at all. The prober starts one every `every`
seconds on its own connection (a thread pool), which is what a population of users
does, and records when each started and ended, relative to `zero` (monotonic).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx


@dataclass
class Record:
    start: float
    end: float
    ok: bool


class Prober:
    def __init__(
        self,
        url: str,
        zero: float,
        path: str = "/v1/models",
        timeout: float = 2.0,
        every: float = 0.1,
    ) -> None:
        self.url, self.zero, self.path = url, zero, path
        self.timeout, self.every = timeout, every
        self.records: list[Record] = []
        self._stop = threading.Event()
        # Enough threads for every probe of a whole timeout to be waiting at once.
        self._pool = ThreadPoolExecutor(max_workers=int(timeout / every) + 8)
        self._thread = threading.Thread(target=self._run)

    def _probe(self) -> None:
        start = time.monotonic() - self.zero
        try:
            r = httpx.get(self.url + self.path, timeout=httpx.Timeout(self.timeout, connect=0.5))
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        self.records.append(Record(start, time.monotonic() - self.zero, ok))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._pool.submit(self._probe)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)  # each probe is bounded by its timeout


def takeover(records: list[Record], fault_at: float) -> float:
    """Seconds from the fault until new requests succeed again for good: the start of
    the first one after which every one started succeeded."""
    after = sorted((r for r in records if r.start >= fault_at), key=lambda r: r.start)
    recovered = None
    for r in after:
        if not r.ok:
            recovered = None
        elif recovered is None:
            recovered = r.start
    assert recovered is not None, "requests never succeeded again"
    return recovered - fault_at
