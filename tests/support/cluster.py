"""A whole cluster in one test process: simulator processes, real agents, real relay,
a real redis-server. Faults are real too: SIGKILL/SIGSTOP of an engine process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from ha_agent.config import AgentSettings, RelaySettings
from ha_agent.gateway.service import RelayService
from ha_agent.node.agent import NodeAgent
from tests.support.processes import RedisProcess, free_port
from tests.support.sim import SimHandle, sim_process

FAST_AGENT: dict[str, Any] = {
    "lease_ttl": 1.5,
    "loop_wait": 0.2,
    "retry_timeout": 0.3,
    "safety_margin": 0.3,
    "scrape_interval": 0.1,
    "scrape_timeout": 0.5,
    "stall_timeout": 0.5,
    "canary_idle": 1.0,
    "canary_timeout": 0.5,
    "supervisor_socket": None,
}


@dataclass
class LocalNode:
    name: str
    engine_port: int
    api_port: int
    sim: SimHandle | None = None
    agent: NodeAgent | None = None
    _sim_cm: Any = None

    @property
    def engine_url(self) -> str:
        return f"http://127.0.0.1:{self.engine_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


@dataclass
class LocalCluster:
    redis: RedisProcess
    workdir: str
    nodes: dict[str, LocalNode] = field(default_factory=dict)
    relay: RelayService | None = None
    relay_port: int = 0
    admin_port: int = 0
    sim_env: dict[str, str] = field(default_factory=dict)
    # Agents watch their engine's process and its log (sidecar mode, engine_process):
    # how it died (the engine's own exception, an OOM) reaches the relay.
    watch_process: bool = False

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.relay_port}"

    # -- building -----------------------------------------------------------------------

    def redis_settings(self) -> dict[str, Any]:
        return {
            "cluster": "local",
            "redis_url": self.redis.url,
            "redis_password": SecretStr(self.redis.password),
        }

    def start_engine(self, name: str) -> None:
        node = self.nodes[name]
        log_file = self.engine_log(name) if self.watch_process else None
        node._sim_cm = sim_process(name, port=node.engine_port, log_file=log_file, **self.sim_env)
        node.sim = node._sim_cm.__enter__()

    def engine_log(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.engine.log")

    def kill_engine(self, name: str, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[name]
        assert node.sim is not None and node.sim.proc is not None
        os.kill(node.sim.proc.pid, sig)
        if sig == signal.SIGKILL:
            node.sim.proc.wait(timeout=5)
            node._sim_cm.__exit__(None, None, None)
            node.sim = None

    def freeze_engine(self, name: str) -> None:
        self.kill_engine(name, signal.SIGSTOP)

    def thaw_engine(self, name: str) -> None:
        self.kill_engine(name, signal.SIGCONT)

    async def start_agent(self, name: str, supervised: bool = False, **overrides: Any) -> None:
        node = self.nodes[name]
        if self.watch_process:
            overrides = {
                "engine_process": f"ha_agent.sim --host 127.0.0.1 --port {node.engine_port}",
                "engine_log": self.engine_log(name),
                **overrides,
            }
        settings = AgentSettings(
            node_name=name,
            engine_url=node.engine_url,
            advertise_engine_url=node.engine_url,
            advertise_api_url=node.api_url,
            api_host="127.0.0.1",
            api_port=node.api_port,
            admin_token=SecretStr("test-token"),
            ha_log=os.path.join(self.workdir, f"{name}.ha.log"),
            **self.redis_settings(),
            **{**FAST_AGENT, **overrides},
        )
        node.agent = NodeAgent(settings, supervised=supervised)
        await node.agent.start()

    async def stop_agent(self, name: str, release: bool = True) -> None:
        node = self.nodes[name]
        if node.agent is not None:
            await node.agent.stop(release=release)
            node.agent = None

    async def start_relay(self, **overrides: Any) -> None:
        self.relay_port, self.admin_port = free_port(), free_port()
        settings = RelaySettings(
            relay_host="127.0.0.1",
            relay_port=self.relay_port,
            relay_admin_port=self.admin_port,
            relay_host_admin="127.0.0.1",
            nodes=[f"{n.name}={n.engine_url}={n.api_url}" for n in self.nodes.values()],
            poll_interval=0.2,
            connect_timeout=0.3,
            retry_deadline=15.0,
            ha_log=os.path.join(self.workdir, "relay.ha.log"),
            **self.redis_settings(),
            **overrides,
        )
        self.relay = RelayService(settings)
        await self.relay.start()

    # -- observing ----------------------------------------------------------------------

    def primary(self) -> str | None:
        for node in self.nodes.values():
            if node.agent is not None and node.agent.ha.is_primary():
                return node.name
        return None

    def primary_sim(self) -> tuple[str, SimHandle]:
        """The primary's name and its simulator (to inject faults into)."""
        primary = self.primary()
        assert primary is not None
        sim = self.nodes[primary].sim
        assert sim is not None
        return primary, sim

    async def wait_for(self, predicate: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    async def wait_ready(self, timeout: float = 15.0) -> str:
        """Until one primary exists, every engine is healthy and the relay routes to it."""

        def ready() -> str | None:
            p = self.primary()
            healthy = all(
                n.agent is not None and n.agent.ha.engine_health.healthy
                for n in self.nodes.values()
            )
            relay_ok = self.relay is None or (
                self.relay.topology.primary == p
                and all(v.can_serve(time.monotonic()) for v in self.relay.topology.nodes.values())
            )
            return p if p and healthy and relay_ok else None

        primary: str = await self.wait_for(ready, timeout, "a ready cluster")
        return primary

    def other(self, name: str) -> str:
        return next(n for n in self.nodes if n != name)

    def ha_log(self, name: str) -> str:
        with open(os.path.join(self.workdir, f"{name}.ha.log")) as fh:
            return fh.read()


@contextlib.asynccontextmanager
async def local_cluster(
    redis: RedisProcess,
    names: tuple[str, ...] = ("sglang-01", "sglang-02"),
    relay: bool = True,
    sim_env: dict[str, str] | None = None,
    watch_process: bool = False,
    agent_settings: dict[str, Any] | None = None,
    relay_settings: dict[str, Any] | None = None,
) -> AsyncIterator[LocalCluster]:
    workdir = tempfile.mkdtemp(prefix="sglang-ha-cluster-")
    cluster = LocalCluster(
        redis=redis, workdir=workdir, sim_env=sim_env or {}, watch_process=watch_process
    )
    for name in names:
        cluster.nodes[name] = LocalNode(name, free_port(), free_port())
    try:
        for name in names:
            cluster.start_engine(name)
        for name in names:
            await cluster.start_agent(name, **(agent_settings or {}))
        if relay:
            await cluster.start_relay(**(relay_settings or {}))
        yield cluster
    finally:
        if cluster.relay is not None:
            await cluster.relay.stop()
        for name, node in cluster.nodes.items():
            with contextlib.suppress(Exception):
                await cluster.stop_agent(name, release=False)
            if node.sim is not None:
                with contextlib.suppress(Exception):
                    node._sim_cm.__exit__(None, None, None)


OnEvent = Callable[[list[str], httpx.Response], Awaitable[None]]


async def collect_stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], on_event: OnEvent | None = None
) -> list[str]:
    """The `data:` payloads of one SSE response, in order. ``on_event`` is awaited after
    each payload with those so far, to break something mid-stream."""
    out: list[str] = []
    async with client.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                out.append(line[5:].strip())
                if on_event is not None:
                    await on_event(out, resp)
    return out
