"""One file-watching chore of the gateway's watchdog, run every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


async def every(
    interval: float, check: Callable[[], object], stop: asyncio.Event, what: str
) -> None:
    """`check` (blocking file work: in a thread) every `interval` s until `stop`; one
    failed look is logged and never ends the watch."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(check)
        except Exception:
            log.exception("BUG: %s failed", what)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
