"""The node agent as one object: wiring, start and stop (used by __main__ and tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from ha_agent import events as ev
from ha_agent.auth import TokenAuth
from ha_agent.config import AgentSettings
from ha_agent.dcs.base import DCSError, LeaseStore, NodeRemoved, Role
from ha_agent.dcs.redis_sentinel import RedisLeaseStore
from ha_agent.events import EventLog
from ha_agent.node.api import AgentApi
from ha_agent.node.engine.client import EngineClient
from ha_agent.node.engine.container import ContainerWatch
from ha_agent.node.engine.monitor import HealthMonitor
from ha_agent.node.engine.process import HostProcessWatch, ProcessWatch, SupervisorWatch
from ha_agent.node.engine_control import EngineControl
from ha_agent.node.engine_restart import EngineRestarter
from ha_agent.node.ha import Ha
from ha_agent.node.metrics import AgentMetrics
from ha_agent.node.peers import PeerClient

log = logging.getLogger(__name__)


def engine_process_watch(settings: AgentSettings, supervised: bool) -> ProcessWatch | None:
    """Who can tell how the engine died: our supervisord, or in sidecar mode the
    user's container or process; None leaves HTTP signals only."""
    if settings.engine_container:
        return ContainerWatch(settings.engine_container, settings.docker_host)
    if settings.engine_pid or settings.engine_process:
        return HostProcessWatch(settings.engine_pid, settings.engine_process, settings.engine_log)
    if supervised and settings.supervisor_socket:
        return SupervisorWatch(settings.supervisor_socket, settings.engine_program)
    return None


class NodeAgent:
    def __init__(
        self, settings: AgentSettings, supervised: bool, store: LeaseStore | None = None
    ) -> None:
        self.s = settings
        self.store = store or RedisLeaseStore(settings, retry_timeout=settings.retry_timeout)
        self.events = EventLog(settings.ha_log, settings.node_name, self.store)
        self.process = engine_process_watch(settings, supervised)
        self.metrics = AgentMetrics()
        self.monitor = HealthMonitor(
            settings,
            EngineClient(
                settings.engine_url,
                settings.engine_headers(),
                settings.engine_admin_headers(),
                settings.engine_ssl_context(),
                settings.engine_keepalive_timeout,
            ),
            self.process,
        )
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        # Acks get what a store operation gets (retry_timeout): asked only when the
        # store is away, and the lease's safety margin already covers that much.
        self.peers = PeerClient(
            timeout=min(settings.retry_timeout, 0.5),
            admin_token=token,
            ack_budget=settings.retry_timeout,
        )
        self.ha = Ha(settings, self.store, self.monitor, self.events, self.peers)
        self.metrics.attach(self.ha)
        self.ha.settings_observers.append(self._settings_changed)
        control = None
        if isinstance(self.process, SupervisorWatch) and settings.supervisor_socket:
            control = EngineControl(settings.supervisor_socket, settings.engine_program)
        self.restarter = EngineRestarter(self.ha, control)
        self.metrics.attach_restarter(self.restarter)
        self.api = AgentApi(
            self.ha, self.metrics, TokenAuth(token, self.metrics.auth_rejected), control
        )
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.s.api_host, self.s.api_port).start()
        watch = f" watch={self.process.describe()}" if self.process else ""
        self.events.emit(ev.AGENT_STARTED, f"{self.s.node_name} engine={self.s.engine_url}{watch}")
        self._tasks = [
            asyncio.ensure_future(self.monitor.run(self._stop)),
            asyncio.ensure_future(self.ha.run(self._stop)),
            asyncio.ensure_future(self.restarter.run(self._stop)),
            asyncio.ensure_future(self.events.forward(self._stop)),
            asyncio.ensure_future(self._follow_notifications()),
        ]

    def _settings_changed(self, settings: AgentSettings) -> None:
        """Dynamic config (edit-config): what is not read from `ha.s` each time."""
        if isinstance(self.store, RedisLeaseStore):
            self.store.retry_timeout = settings.retry_timeout
        self.peers.ack_budget = settings.retry_timeout

    async def _follow_notifications(self) -> None:
        async for message in self.store.watch():
            removed = NodeRemoved.decode(message)
            if removed is not None:
                # Decommissioned (sglang-ha remove): no longer a peer to ask for acks.
                self.ha.state.known_peers.pop(removed.node, None)
            self.ha.wake.set()
            if self._stop.is_set():
                return

    async def stop(self, release: bool = True) -> None:
        """Stop; a primary hands its lease over at once instead of letting it expire.
        `release=False` stops like a crash would (for tests)."""
        self._stop.set()
        if release and self.ha.state.role is Role.PRIMARY:
            with contextlib.suppress(DCSError):
                await self.store.release(self.s.node_name, self.ha.state.epoch)
            self.events.emit(ev.DEMOTED, f"{self.s.node_name} to standby: agent stopping")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.peers.close()
        if self.process is not None:
            await self.process.close()
        await self.store.close()
        self.events.close()
