"""The human HA event log, and the same events in the store for history.

    [2024-05-29 14:22:18] FAILOVER_INITIATED from sglang-01 to sglang-02

Lines go to a file (default /var/log/sglang/ha.log) and stdout through a logging
queue drained by a thread, so the HA loop never waits on a disk. Events go to the
Redis stream from a small bounded buffer that survives a Redis outage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import logging.handlers
import os
import queue
import sys
import time

from ha_agent.dcs.base import DCSError, HAEvent, LeaseStore

log = logging.getLogger(__name__)

# The vocabulary, so that grep, alerts and tests agree on spelling.
LEASE_ACQUIRED = "LEASE_ACQUIRED"
LEASE_RENEW_FAILED = "LEASE_RENEW_FAILED"
LEASE_LOST = "LEASE_LOST"
LEASE_RELEASED = "LEASE_RELEASED"
FENCED = "FENCED"
PROMOTED = "PROMOTED"
DEMOTED = "DEMOTED"
FAILOVER_INITIATED = "FAILOVER_INITIATED"
FAILOVER_FORCED = "FAILOVER_FORCED"
SWITCHOVER_REQUESTED = "SWITCHOVER_REQUESTED"
SWITCHOVER_COMPLETED = "SWITCHOVER_COMPLETED"
FAILBACK_GRANTED = "FAILBACK_GRANTED"
FAILBACK_REFUSED = "FAILBACK_REFUSED"
ENGINE_UNHEALTHY = "ENGINE_UNHEALTHY"
ENGINE_HEALTHY = "ENGINE_HEALTHY"
ENGINE_OOM = "ENGINE_OOM"
# How a dead engine's process ended, when the process watch tells it after the HTTP
# probe found the engine gone (the first line then says only "not listening").
ENGINE_EXITED = "ENGINE_EXITED"
# The agent restarts its own hung engine once another node serves (node/engine_restart.py).
ENGINE_AUTO_RESTART = "ENGINE_AUTO_RESTART"
ENGINE_AUTO_RESTART_FAILED = "ENGINE_AUTO_RESTART_FAILED"
ENGINE_AUTO_RESTART_EXHAUSTED = "ENGINE_AUTO_RESTART_EXHAUSTED"
DEGRADED_MODE_ENTERED = "DEGRADED_MODE_ENTERED"
DEGRADED_MODE_EXITED = "DEGRADED_MODE_EXITED"
PAUSED = "PAUSED"
RESUMED = "RESUMED"
AGENT_STARTED = "AGENT_STARTED"
LEADER_CHANGED = "LEADER_CHANGED"
NODE_UNREACHABLE = "NODE_UNREACHABLE"
NODE_REACHABLE = "NODE_REACHABLE"
NODE_REMOVED = "NODE_REMOVED"
# Pool mode (node/pool.py): a node starts serving, is taken out, serves again.
NODE_SERVING = "NODE_SERVING"
NODE_OUT_OF_SERVICE = "NODE_OUT_OF_SERVICE"
NODE_REJOINED = "NODE_REJOINED"
STREAM_MIGRATED = "STREAM_MIGRATED"
QUERY_QUARANTINED = "QUERY_QUARANTINED"  # relay: a request that took down two nodes
# Relay: new requests refused for their expected queue wait, and the end of it.
SHEDDING_STARTED = "SHEDDING_STARTED"
SHEDDING_STOPPED = "SHEDDING_STOPPED"
RELAY_WORKER_STALLED = "RELAY_WORKER_STALLED"  # watchdog: a relay worker froze
RELAY_WORKER_RECOVERED = "RELAY_WORKER_RECOVERED"  # watchdog: it beats again
# Operator actions (sglang-ha edit-config, restart, remove).
CONFIG_CHANGED = "CONFIG_CHANGED"
ENGINE_RESTART_REQUESTED = "ENGINE_RESTART_REQUESTED"


class EventLog:
    def __init__(self, path: str | None, node: str, store: LeaseStore | None = None) -> None:
        self.node = node
        self.store = store
        self._pending: collections.deque[HAEvent] = collections.deque(maxlen=1000)
        self._wake = asyncio.Event()
        self.recent: collections.deque[HAEvent] = collections.deque(maxlen=50)

        # One logger per log, not per name: a relay worker holds two logs named "relay"
        # (its own events, and the topology's, which only worker 0 writes to the file),
        # and a shared logger would take the second one's handlers for both.
        self._logger = logging.getLogger(f"sglang_ha.events.{node}.{id(self):x}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
        if path:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                handlers.append(logging.FileHandler(path))
            except OSError as exc:
                log.warning("HA log %s not writable (%s); events go to stdout only", path, exc)
        for handler in handlers:
            handler.setFormatter(fmt)
        q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._logger.handlers = [logging.handlers.QueueHandler(q)]
        self._listener = logging.handlers.QueueListener(q, *handlers)
        self._listener.start()

    def emit(self, event: str, detail: str = "") -> HAEvent:
        """Record one event. Never blocks, never raises."""
        item = HAEvent(ts=time.time(), event=event, node=self.node, detail=detail)
        self._logger.info("%s %s", event, detail) if detail else self._logger.info("%s", event)
        self.recent.append(item)
        if self.store is not None:
            self._pending.append(item)
            self._wake.set()
        return item

    async def forward(self, stop: asyncio.Event) -> None:
        """Push events to the store's stream; keep them while it is away."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            while self._pending and self.store is not None:
                try:
                    await self.store.append_event(self._pending[0])
                except DCSError:
                    break  # try again on the next wake-up or second
                self._pending.popleft()

    def close(self) -> None:
        self._listener.stop()
