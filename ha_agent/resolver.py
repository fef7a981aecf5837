"""Name resolution that a slow DNS cannot stall.

Why: asyncio resolves names with blocking getaddrinfo() calls on a small shared
thread pool. When a container disappears, lookups of its name can take seconds
(Docker's DNS forwards unknown names and waits); the Redis client's lookups of a
stopped Sentinel then fill the pool, and the relay's connections to perfectly
healthy engines time out waiting for a thread. Measured in the all-Sentinels-down
test before this module existed.

So the data path resolves on its own small pool, remembers the last good answer
per name, answers from that memory while a refresh runs, and keeps a stale answer
when a refresh fails (a node whose name vanished fails to connect instead, which
the relay already handles).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time

from aiohttp.abc import AbstractResolver, ResolveResult

_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class CachingResolver(AbstractResolver):
    def __init__(self, ttl: float = 5.0, timeout: float = 2.0, threads: int = 2) -> None:
        self.ttl = ttl
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="dns")
        self._cache: dict[tuple[str, int, int], tuple[float, list[ResolveResult]]] = {}
        self._refreshing: set[tuple[str, int, int]] = set()
        self._tasks: set[asyncio.Future[None]] = set()  # keep refreshes referenced

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        key = (host, port, int(family))
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached is not None:
            if now - cached[0] > self.ttl and key not in self._refreshing:
                self._refreshing.add(key)
                task = asyncio.ensure_future(self._refresh(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return cached[1]
        return await self._lookup(key)

    async def _refresh(self, key: tuple[str, int, int]) -> None:
        try:
            await self._lookup(key)
        except OSError:
            pass  # keep the stale answer
        finally:
            self._refreshing.discard(key)

    async def _lookup(self, key: tuple[str, int, int]) -> list[ResolveResult]:
        host, port, family = key
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.run_in_executor(
                    self._pool,
                    lambda: socket.getaddrinfo(host, port, family, socket.SOCK_STREAM),
                ),
                timeout=self.timeout,
            )
        except asyncio.TimeoutError as exc:
            raise OSError(f"resolving {host} timed out after {self.timeout:g}s") from exc
        results: list[ResolveResult] = []
        for fam, _type, proto, _canon, address in infos:
            results.append(
                ResolveResult(
                    hostname=host,
                    host=str(address[0]),
                    port=int(address[1]),
                    family=fam,
                    proto=proto,
                    flags=_NUMERIC,
                )
            )
        if not results:
            raise OSError(f"{host} has no address")
        self._cache[key] = (time.monotonic(), results)
        return results

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
