"""The relay as one object: wiring, start and stop (used by __main__ and tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time

from aiohttp import web

from ha_agent.config import DynamicConfig, RelaySettings
from ha_agent.dcs.base import LeaseStore
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from ha_agent.events import EventLog, HAEvent
from ha_agent.gateway.admin import RelayAdmin
from ha_agent.gateway.admission.limits import learn_context_length
from ha_agent.gateway.admission.wait import learn_slots
from ha_agent.gateway.edge.nginx_sync import (
    keep_client_keys_in_sync,
    keep_in_sync,
    relay_worker_socket,
)
from ha_agent.gateway.edge.watchdog import beat
from ha_agent.gateway.edge.workers import share
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.stream.relay import Relay
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import Transport
from ha_agent.gateway.upstream.warming import Warmer

log = logging.getLogger(__name__)


class _OtherWorkersEvents(EventLog):
    """The topology's events in workers other than 0: worker 0 records each one
    once for the gateway (every worker sees the same changes)."""

    def emit(self, event: str, detail: str = "") -> HAEvent:
        return HAEvent(ts=time.time(), event=event, node=self.node, detail=detail)


class RelayService:
    def __init__(self, settings: RelaySettings, store: LeaseStore | None = None) -> None:
        self.s = settings
        self.store = store or RedisLeaseStore(
            settings, retry_timeout=min(settings.poll_interval, 0.5)
        )
        # Per-request events (STREAM_MIGRATED) come from the worker holding the stream.
        self.events = EventLog(settings.ha_log, "relay", self.store)
        self.leading_worker = settings.relay_worker_index == 0
        workers = max(settings.relay_workers, 1)  # 0 (not resolved): one process
        self.workers = workers
        topology_events = (
            self.events if self.leading_worker else _OtherWorkersEvents(None, "relay", None)
        )
        self.topology = Topology(settings, self.store, topology_events)
        self.metrics = RelayMetrics()
        self.metrics.attach(self.topology)
        self.transport = Transport(
            settings.connect_timeout,
            settings.first_byte_timeout,
            settings.engine_headers(),
            settings.engine_admin_headers(),
            settings.engine_ssl_context(),
            settings.engine_keepalive_timeout,
        )
        self.warmer = Warmer(
            self.topology,
            self.transport,
            share(settings.warm_rate, workers),  # the configured rate is the gateway's
            self.metrics.registry,
            max_inflight=math.ceil(settings.warm_max_inflight / workers),
            max_chars=settings.warm_max_chars,
            pool=self.topology.pool,
            affinity_block=settings.affinity_block_chars,
            affinity_max_chars=settings.affinity_max_chars,
        )
        self.topology.config_observers.append(self._config_changed)
        self.relay = Relay(
            settings, self.topology, self.transport, self.metrics, self.events, self.warmer
        )
        self._data: web.AppRunner | None = None
        self._admin: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []

    def _config_changed(self, config: DynamicConfig) -> None:
        """edit-config's warming rate, or the environment's when it is unset (the rate
        is the gateway's: each worker takes its share)."""
        total = config.warm_rate if config.warm_rate is not None else self.s.warm_rate
        rate = share(total, self.workers)
        if rate != self.warmer.rate:
            # Said in the gateway's terms, as edit-config set it; the worker's share after.
            log.info(
                "warming rate %g -> %g mirrors/s (dynamic config; %g per worker of %d)",
                self.warmer.rate * self.workers,
                total,
                rate,
                self.workers,
            )
            self.warmer.rate = rate

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its request, which
        # closes the upstream connection, which makes the engine abort the generation.
        self._data = web.AppRunner(
            self.relay.app(), access_log=None, handle_signals=False, handler_cancellation=True
        )
        self._admin = web.AppRunner(
            RelayAdmin(self.topology, self.metrics).app(), access_log=None, handle_signals=False
        )
        await self._data.setup()
        await self._admin.setup()
        await self.topology.refresh()  # route only once a first view is in
        await web.TCPSite(
            self._data, self.s.relay_host, self.s.relay_port, backlog=1024, reuse_port=True
        ).start()
        if self.s.relay_worker_socket_dir:
            # Its own Unix socket besides: Nginx lists each worker, so that the watchdog
            # can take a frozen one out of the rotation (watchdog.py), and a Unix socket
            # costs Nginx and the relay less per streamed event than loopback TCP.
            path = relay_worker_socket(self.s.relay_worker_socket_dir, self.s.relay_worker_index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left by this worker's previous life
            await web.UnixSite(self._data, path, backlog=1024).start()
        # Every worker answers the admin port too; /metrics sums over the workers.
        await web.TCPSite(
            self._admin, self.s.relay_host_admin, self.s.relay_admin_port, reuse_port=True
        ).start()
        log.info(
            "relay worker %d on %s:%d, primary %s",
            self.s.relay_worker_index,
            self.s.relay_host,
            self.s.relay_port,
            self.topology.primary,
        )
        self._tasks = [
            asyncio.ensure_future(self.topology.run(self._stop)),
            asyncio.ensure_future(self.events.forward(self._stop)),
            asyncio.ensure_future(self.relay.spares.run(self._stop)),
            asyncio.ensure_future(
                learn_context_length(
                    self.relay.admission.limits, self.topology, self.transport, self._stop
                )
            ),
            asyncio.ensure_future(
                learn_slots(self.relay.admission.wait, self.transport, self._stop)
            ),
        ]
        if self.s.heartbeat_dir is not None:  # the watchdog's sign of life (watchdog.py)
            self._tasks.append(
                asyncio.ensure_future(
                    beat(
                        self.s.heartbeat_dir,
                        self.s.relay_worker_index,
                        self.s.heartbeat_interval,
                        self._stop,
                    )
                )
            )
        keys = self.relay.clients.keys
        if keys is not None and self.s.nginx_client_keys_file and self.leading_worker:
            self._tasks.append(
                asyncio.ensure_future(
                    keep_client_keys_in_sync(
                        keys, self.s.nginx_client_keys_file, self.s.nginx_reload_command, self._stop
                    )
                )
            )
        if self.s.nginx_backup_file and self.leading_worker:
            self._tasks.append(
                asyncio.ensure_future(
                    keep_in_sync(
                        self.topology,
                        self.s.nginx_backup_file,
                        self.s.nginx_reload_command,
                        self._stop,
                    )
                )
            )

    async def stop(self) -> None:
        self._stop.set()
        if self._data is not None:
            # Streams in flight finish: Nginx stops sending to a closed port.
            await self._data.shutdown()
            await self._data.cleanup()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.relay.spares.close()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.transport.close()
        await self.store.close()
        self.events.close()
