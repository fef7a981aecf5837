"""A hung primary, end to end: real supervisord per node running a simulator process,
real agents and Redis. The role moves, then the old primary's agent kills its engine
through supervisord, a new one starts, and the node is a healthy standby again without
any command, within the bound docs/failover.md states.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from supervisor.xmlrpc import SupervisorTransport

from tests.support.cluster import LocalCluster, LocalNode
from tests.support.processes import RedisProcess, free_port, stop_process, wait_until
from tests.support.sim import FAST, SimHandle

ROOT = Path(__file__).resolve().parents[2]
RESTART_AFTER = 2.0


def supervisor_conf(workdir: str, port: int) -> str:
    """images/node/supervisord.conf's engine program, pointed at a simulator."""
    return f"""
[supervisord]
nodaemon=true
logfile={workdir}/supervisord.log
pidfile={workdir}/supervisord.pid

[unix_http_server]
file={workdir}/supervisor.sock
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:engine]
command={sys.executable} -m ha_agent.sim --host 127.0.0.1 --port {port}
directory={ROOT}
autorestart=true
startsecs=1
startretries=1000
stopwaitsecs=30
stopasgroup=true
killasgroup=true
stdout_logfile={workdir}/engine.log
stderr_logfile={workdir}/engine.err.log
"""


@contextlib.contextmanager
def supervised_engine(workdir: str, port: int) -> Iterator[str]:
    """supervisord running the engine; yields its socket."""
    os.makedirs(workdir, exist_ok=True)
    conf = os.path.join(workdir, "supervisord.conf")
    Path(conf).write_text(supervisor_conf(workdir, port))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update({f"SIM_{k.upper()}": str(v) for k, v in FAST.items()})
    supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
    proc = subprocess.Popen(
        [supervisord, "-n", "-c", conf],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200,
            timeout=30,
            what="supervised simulator to start",
        )
        yield os.path.join(workdir, "supervisor.sock")
    finally:
        stop_process(proc, timeout=10)


def engine_pid(socket: str) -> int:
    transport = SupervisorTransport(None, None, f"unix://{socket}")
    rpc: Any = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    return int(rpc.supervisor.getProcessInfo("engine")["pid"])


@pytest.fixture
async def cluster(redis_proc: RedisProcess) -> AsyncIterator[tuple[LocalCluster, dict[str, str]]]:
    workdir = tempfile.mkdtemp(prefix="sglang-ha-restart-")
    cluster = LocalCluster(redis=redis_proc, workdir=workdir)
    sockets: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for name in ("sglang-01", "sglang-02"):
            node = LocalNode(name, free_port(), free_port())
            cluster.nodes[name] = node
            sockets[name] = stack.enter_context(
                supervised_engine(os.path.join(workdir, name), node.engine_port)
            )
            node.sim = SimHandle(url=node.engine_url)
        try:
            for name, socket in sockets.items():
                await cluster.start_agent(
                    name,
                    supervised=True,
                    supervisor_socket=socket,
                    engine_restart_after=RESTART_AFTER,
                )
            yield cluster, sockets
        finally:
            for name in cluster.nodes:
                with contextlib.suppress(Exception):
                    await cluster.stop_agent(name, release=False)


async def test_hung_primary_is_restarted_and_is_a_healthy_standby_again(
    cluster: tuple[LocalCluster, dict[str, str]],
) -> None:
    c, sockets = cluster
    old = await c.wait_ready(timeout=30)
    new = c.other(old)
    old_node, new_node = c.nodes[old], c.nodes[new]
    assert old_node.sim is not None and old_node.agent is not None
    pid_before = engine_pid(sockets[old])

    started = time.monotonic()
    await old_node.sim.faults(hang=True)
    await c.wait_for(lambda: c.primary() == new, 15, f"{new} to take over")
    moved = time.monotonic() - started
    await c.wait_for(
        lambda: "ENGINE_AUTO_RESTART " in c.ha_log(old), 30, f"{old} restarting its engine"
    )
    restarted = time.monotonic() - started
    agent = old_node.agent
    await c.wait_for(
        lambda: agent.ha.is_standby() and agent.ha.engine_health.healthy,
        30,
        f"{old} a healthy standby again",
    )
    back = time.monotonic() - started
    print(f"role moved {moved:.1f}s, restart {restarted:.1f}s, healthy standby {back:.1f}s")

    assert engine_pid(sockets[old]) != pid_before, "the engine process was replaced"
    assert c.primary() == new, "the restart did not move the role again"
    log = c.ha_log(old)
    assert "ENGINE_AUTO_RESTART_FAILED" not in log, log
    assert f"{new} is primary; restart 1 of 3" in log, log
    status = agent.ha.status()
    assert status.engine_restarts == 1 and status.engine.healthy
    # The bound docs/failover.md states: the hang verdict + engine_restart_after, then
    # the engine's own start (a simulator: about a second) and one canary.
    assert back < moved + RESTART_AFTER + 15.0, (moved, restarted, back)
    assert new_node.agent is not None and new_node.agent.ha.is_primary()


async def restart_by_admin(node: LocalNode) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(
            f"{node.api_url}/ha/restart-engine",
            json={},
            headers={"Authorization": "Bearer test-token"},
        )
    return r.status_code, r.json(), time.monotonic() - started


async def test_planned_restart_of_the_standby_drains_on_sigterm_and_comes_back(
    cluster: tuple[LocalCluster, dict[str, str]],
) -> None:
    """`sglang-ha restart` of a standby: supervisord's SIGTERM, which SGLang (and the
    simulator) answers by draining, then exiting once nothing is left: seconds, not
    supervisord's 30 s stopwaitsecs. No role change."""
    c, sockets = cluster
    primary = await c.wait_ready(timeout=30)
    standby = c.other(primary)
    node = c.nodes[standby]
    assert node.agent is not None
    pid_before = engine_pid(sockets[standby])
    code, body, took = await restart_by_admin(node)
    assert code == 200, body
    assert body["pid"] != pid_before
    # SGLang looks for SIGTERM every 5 s, then finds nothing to drain.
    assert took < 5.0 + 5.0, took
    agent = node.agent
    await c.wait_for(
        lambda: agent.ha.is_standby() and agent.ha.engine_health.healthy, 30, "healthy again"
    )
    assert c.primary() == primary
    assert "ENGINE_AUTO_RESTART" not in c.ha_log(standby)


async def test_admin_restart_of_a_hung_engine_kills_it_rather_than_waiting_on_its_drain(
    cluster: tuple[LocalCluster, dict[str, str]],
) -> None:
    """A hung engine never finishes SGLang's SIGTERM drain: a stop would last
    supervisord's whole stopwaitsecs (30 s). The agent kills it instead."""
    c, sockets = cluster
    primary = await c.wait_ready(timeout=30)
    standby = c.other(primary)
    node = c.nodes[standby]
    assert node.sim is not None and node.agent is not None
    agent = node.agent
    pid_before = engine_pid(sockets[standby])
    await node.sim.faults(hang=True)
    # A request in flight that never finishes: what SGLang's drain would wait for.
    async with httpx.AsyncClient(timeout=60) as http:
        stuck = asyncio.ensure_future(
            http.post(f"{node.engine_url}/generate", json={"text": "x"}, timeout=60)
        )
        await c.wait_for(lambda: agent.ha.engine_health.state.value == "hung", 15, "hung")
        code, body, took = await restart_by_admin(node)
        stuck.cancel()
    assert code == 200, body
    assert body["pid"] != pid_before
    assert took < 10.0, f"waited {took:.1f}s: the stop waited on the drain"
    await c.wait_for(lambda: agent.ha.engine_health.healthy, 30, "healthy again")
    assert c.primary() == primary
