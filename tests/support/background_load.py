"""Run the openai-client load from tests/failover in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.failover.load import Load, RequestRecord


@dataclass
class LoadResult:
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def failed(self) -> list[RequestRecord]:
        return [r for r in self.records if not r.ok]

    @property
    def mismatched(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok and r.text_matches is False]

    def summary(self) -> str:
        errors = {r.error for r in self.failed}
        return (
            f"{len(self.records)} requests, {len(self.failed)} failed"
            f" ({sum(1 for r in self.failed if r.stream)} streams),"
            f" {len(self.mismatched)} text mismatches;"
            f" errors: {sorted(e or '' for e in errors)[:5]}"
        )


@contextlib.contextmanager
def background_load(
    base_url: str,
    concurrency: int = 6,
    stream_every: int = 2,
    clock_zero: float | None = None,
) -> Iterator[LoadResult]:
    """Load runs while the block runs; stops (bounded) when it exits. Records' times
    are seconds after `clock_zero` (a time.monotonic() value; default: the start)."""
    result = LoadResult()
    started = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        load = Load(
            base_url,
            concurrency=concurrency,
            stream_every=stream_every,
            clock_zero=clock_zero,
        )
        stop = asyncio.Event()
        holder["loop"], holder["stop"] = loop, stop
        try:
            loop.run_until_complete(load.take_references())
            started.set()
            result.records = loop.run_until_complete(load.run(stop))
        finally:
            started.set()
            loop.run_until_complete(load.close())
            loop.close()

    thread = threading.Thread(target=run, name="load", daemon=True)
    thread.start()
    if not started.wait(timeout=60):
        raise AssertionError("load did not start")
    try:
        yield result
    finally:
        loop = holder.get("loop")
        stop = holder.get("stop")
        if isinstance(loop, asyncio.AbstractEventLoop) and isinstance(stop, asyncio.Event):
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=90)
        if thread.is_alive():
            raise AssertionError("load did not stop within 90 s")
