"""Process logging for every component: one format, level from HA_LOG_LEVEL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys

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


def roomy_executor(loop: asyncio.AbstractEventLoop) -> None:
    """A larger default thread pool: libraries resolve names on it (redis-py), and
    a few slow lookups must not starve everything else in the process."""
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(32))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    uvloop.install()
