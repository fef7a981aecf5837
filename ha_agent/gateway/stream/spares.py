"""Spare engine connections: connected, nothing sent, taken by the next stream.

A streaming segment has its own connection (passthrough.py); connecting it cost
~0.16-0.19 ms of a stream's time to first token on the development machine
(docs/benchmarks.md). Each relay worker keeps a few such connections open ahead of
time to every node a stream would be sent to now, hands one to the next segment and
opens its replacement in the background.

What keeps a spare from losing a request:
- SGLang's server (uvicorn) arms its keep-alive timeout only after a response, not on
  a connection that has not sent a request yet; still, a spare is retired at
  `spare_max_age`, below that timeout (SGLANG_TIMEOUT_KEEP_ALIVE, 5 s by default), in
  case a server in between closes idle connections sooner;
- a spare the engine closed (its shutdown, a crash) is seen by its protocol and never
  handed out; one closed under the request before any response byte is replaced by a
  fresh connection for that request (relay.py): nothing was started;
- spares follow the topology: only to nodes in rotation (the primary, or a pool's
  serving nodes) whose engine is healthy and that are not fenced; a node's spares are
  closed when it leaves, and reopening after a refused connect or a spare the engine
  closed backs off up to `_BACKOFF_MAX`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ha_agent.dcs.base import Role
from ha_agent.gateway.stream import passthrough
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import Transport, UpstreamFailure

log = logging.getLogger(__name__)

# The longest the spares go unchecked against the topology (which itself moves at its
# poll interval, 0.5 s by default), s. Between, they are tended when one is taken, when
# one reaches its age and when a backoff ends: a wake-up costs a relay worker 0.15-0.45
# ms of CPU on the 2-core dev VM, so a fixed 0.1 s tick cost 2-4 ms per second idle.
_FOLLOW = 0.5
# Never sooner than this after the last look, s.
_TICK_MIN = 0.01
# Reopening after a failure waits this long, doubling up to the maximum, s.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0


class Spares:
    def __init__(
        self,
        topology: Topology,
        transport: Transport,
        per_node: int,
        max_age: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topology = topology
        self.transport = transport
        self.per_node = per_node
        self.max_age = max_age
        self.clock = clock
        self.idle: dict[str, list[passthrough.UpstreamStream]] = {}  # by engine URL
        self._opening: dict[str, int] = {}
        self._delay: dict[str, float] = {}  # the current backoff after failures
        self._retry_at: dict[str, float] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._wake = asyncio.Event()
        self._closed = False

    def wanted(self) -> set[str]:
        """Engine URLs a stream would be sent to now."""
        topology = self.topology
        now = topology.clock()
        if topology.pool:
            nodes = list(topology.nodes.values())
        else:
            primary = topology.nodes.get(topology.primary) if topology.primary else None
            nodes = [primary] if primary is not None else []
        return {
            n.engine_url
            for n in nodes
            if n.can_serve(now) and not (n.status is not None and n.status.role is Role.FENCED)
        }

    def take(self, url: str) -> passthrough.UpstreamStream | None:
        """A live spare to `url`, or None (connect as before)."""
        spares = self.idle.get(url)
        if not spares:
            return None
        oldest = asyncio.get_running_loop().time() - self.max_age
        while spares:
            spare = spares.pop()  # the newest
            if self._usable(spare, oldest):
                self._succeeded(url)
                self._wake.set()  # its replacement
                return spare
            spare.close()
        return None

    @staticmethod
    def _usable(spare: passthrough.UpstreamStream, oldest: float) -> bool:
        transport = spare.transport
        return (
            not spare.lost
            and transport is not None
            and not transport.is_closing()
            and spare.opened_at >= oldest
        )

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self.tend()
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.next_tend())
        finally:
            self.close()

    def next_tend(self) -> float:
        """Seconds until something is due: a spare's retirement, a backoff's end, or the
        next look at the topology."""
        due = [_FOLLOW]
        if self.idle:
            now = asyncio.get_running_loop().time()
            due += [
                s.opened_at + self.max_age - now for spares in self.idle.values() for s in spares
            ]
        if self._retry_at:  # a past one allows opening, which the last look did
            now = self.clock()
            due += [at - now for at in self._retry_at.values() if at > now]
        return max(min(due), _TICK_MIN)

    def tend(self) -> None:
        """Close what is no longer wanted, stale or closed; open what is missing."""
        if self._closed:
            return
        wanted = self.wanted()
        oldest = asyncio.get_running_loop().time() - self.max_age
        for url in list(self.idle):
            keep = []
            for spare in self.idle[url]:
                if url in wanted and self._usable(spare, oldest):
                    keep.append(spare)
                    continue
                if spare.lost:  # the engine closed an unused connection: back off
                    self._failed(url)
                else:  # it lasted: connections to this engine hold
                    self._succeeded(url)
                spare.close()
            if keep:
                self.idle[url] = keep
            else:
                del self.idle[url]
        now = self.clock()
        for url in wanted:
            missing = self.per_node - len(self.idle.get(url, ())) - self._opening.get(url, 0)
            if missing <= 0 or now < self._retry_at.get(url, 0.0):
                continue
            for _ in range(missing):
                task = asyncio.ensure_future(self._open(url))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _open(self, url: str) -> None:
        self._opening[url] = self._opening.get(url, 0) + 1
        try:
            spare = await passthrough.connect(
                url, self.transport.resolver, self.transport.connect_timeout, self.transport.ssl
            )
        except UpstreamFailure as failure:
            log.debug("spare connection to %s: %s", url, failure.reason)
            self._failed(url)
            return
        finally:
            self._opening[url] -= 1
        if self._closed or url not in self.wanted():
            spare.close()
            return
        # The backoff is not reset here: an engine that accepts and then closes at once
        # (shutting down) must not be reconnected to in a loop.
        self.idle.setdefault(url, []).append(spare)

    def _succeeded(self, url: str) -> None:
        self._delay.pop(url, None)
        self._retry_at.pop(url, None)

    def _failed(self, url: str) -> None:
        delay = min(self._delay.get(url, _BACKOFF_MIN / 2) * 2, _BACKOFF_MAX)
        self._delay[url] = delay
        self._retry_at[url] = self.clock() + delay

    def close(self) -> None:
        """Close every spare and stop opening any (the relay stops)."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for spares in self.idle.values():
            for spare in spares:
                spare.close()
        self.idle.clear()
