"""Process logging for every component: one format, level from HA_LOG_LEVEL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import sys
from typing import Any

from ha_agent.config import LoggingSettings


def setup(component: str) -> None:
    level = LoggingSettings().log_level
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
    )
    # aiohttp logs every request at INFO; the access log lives in Nginx.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def configure_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A larger default thread pool: libraries resolve names on it (redis-py), and
    a few slow lookups must not starve everything else in the process.

    And one known message quieted: a name lookup whose caller already gave up (a
    bounded Redis connect) ends later with nobody to read its error, and asyncio
    would log that at ERROR each time while a store is away."""
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(32))
    loop.set_exception_handler(_quiet_abandoned_lookups)


def _quiet_abandoned_lookups(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    if isinstance(context.get("exception"), socket.gaierror) and "never retrieved" in str(
        context.get("message", "")
    ):
        logging.getLogger("asyncio").debug("abandoned name lookup failed: %s", context["exception"])
        return
    loop.default_exception_handler(context)


def install_uvloop() -> None:
    # uvloop resolves names on libuv's own pool (4 threads by default), not on the
    # default executor. Lookups that hang (a DNS server that forwards names of stopped
    # containers and never answers) would fill it and stall every later connect, the
    # Redis client's included. Read by libuv once, at the pool's first use.
    os.environ.setdefault("UV_THREADPOOL_SIZE", "32")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    uvloop.install()
