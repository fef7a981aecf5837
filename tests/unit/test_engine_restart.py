"""A hung engine is restarted by its own agent once the role has moved: when, how
often, and never where it would take away the only node that serves.

Two agents on a fake clock and a fake store (as in test_ha.py); supervisord is a fake
that records each kill-and-start.
"""

from __future__ import annotations

import xmlrpc.client
from typing import Any

import pytest
from prometheus_client import generate_latest

from ha_agent import events as ev
from ha_agent.ctl import output
from ha_agent.ctl.client import ClusterView, NodeRow
from ha_agent.dcs.base import AgentStatus, Cluster, Leader, Role
from ha_agent.node.engine.monitor import EngineState
from ha_agent.node.engine_control import EngineControl, EngineControlError
from ha_agent.node.engine_restart import EngineRestarter
from ha_agent.node.metrics import AgentMetrics
from tests.support.fakes import FakeClock, FakeStore, agent_status
from tests.unit.test_ha import Node, make_node


class FakeControl:
    """supervisord as EngineControl drives it: each call is one kill-and-start."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.fail: str | None = None
        self.busy = False

    async def kill_and_start(self, timeout: float) -> int:
        self.calls.append(timeout)
        if self.fail:
            raise EngineControlError(self.fail)
        return 4000 + len(self.calls)


class Pair:
    def __init__(self, a: Node, b: Node, clock: FakeClock, control: FakeControl | None) -> None:
        self.a, self.b, self.clock = a, b, clock
        self.restarter = EngineRestarter(a.ha, control, clock=clock)  # type: ignore[arg-type]

    async def run(self, seconds: float) -> None:
        """Both agents' cycles and a's restart check, every 0.5 s, for `seconds`."""
        steps = round(seconds / 0.5)
        for _ in range(steps):
            self.clock.advance(0.5)
            await self.a.ha.run_cycle()
            await self.b.ha.run_cycle()
            await self.restarter.step()

    def restarts(self) -> list[str]:
        return [e for e in self.a.emitted() if e.startswith("ENGINE_AUTO_RESTART")]


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


async def hung_primary(store: FakeStore, clock: FakeClock, control: FakeControl | None) -> Pair:
    """a was primary, its engine hangs, the role moves to b."""
    a = make_node("sglang-01", store, clock, "sglang-02")
    b = make_node("sglang-02", store, clock, "sglang-01")
    pair = Pair(a, b, clock, control)
    await pair.run(1.0)
    assert a.ha.is_primary()
    a.engine.set(EngineState.HUNG, "canary timed out after 2s")
    await pair.run(1.0)
    assert b.ha.is_primary() and store.leader == (2, "sglang-02")
    return pair


async def test_hung_old_primary_is_restarted_once_the_role_moved(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    pair = await hung_primary(store, clock, control)
    await pair.run(8.0)
    assert control.calls == [], "restarted before engine_restart_after (10 s)"
    assert pair.a.ha.status().engine_restart.startswith("engine hung for 9s; restart after 10s")
    await pair.run(1.5)
    assert control.calls == [60.0]
    assert pair.restarts() == [
        "ENGINE_AUTO_RESTART sglang-01: engine hung for 10s (canary timed out after 2s);"
        " sglang-02 is primary; restart 1 of 3 in 3600s"
    ]
    # The same hang is not restarted again while the monitor still reports it.
    await pair.run(30.0)
    assert len(control.calls) == 1
    # The new engine is healthy: a healthy standby again, without any command.
    pair.a.engine.set(EngineState.HEALTHY, "canary ok")
    await pair.run(0.5)
    status = pair.a.ha.status()
    assert status.role is Role.STANDBY and status.engine.healthy and pair.a.ha.is_standby()
    assert status.engine_restarts == 1
    # status carries it to the CLI, and back.
    assert AgentStatus.from_json(status.to_json()).engine_restarts == 1


async def test_an_engine_that_answers_again_before_its_restart_is_not_restarted(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    # The hang ended a moment ago, but the sick engine's canaries back off, so the
    # verdict still reads hung when the restart is due: it is asked once more first.
    pair = await hung_primary(store, clock, control)
    pair.a.engine.recheck = EngineState.HEALTHY
    await pair.run(10.0)
    assert pair.a.engine.rechecks == 1
    assert control.calls == [] and pair.restarts() == []
    await pair.run(1.0)
    status = pair.a.ha.status()
    assert status.role is Role.STANDBY and status.engine.healthy
    assert status.engine_restarts == 0


async def test_never_restarted_while_holding_the_lease(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    a = make_node("sglang-01", store, clock, "sglang-02")
    b = make_node("sglang-02", store, clock, "sglang-01")
    pair = Pair(a, b, clock, control)
    await pair.run(1.0)
    await pair.a.ha.run_cycle()
    a.engine.set(EngineState.HUNG, "frozen")
    # The lease is still ours until the next cycle releases it.
    clock.advance(60.0)
    decision = await pair.restarter.step()
    assert not decision.restart and "holds the lease" in decision.why
    assert control.calls == []


async def test_never_restarted_when_no_other_node_serves(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    pair = await hung_primary(store, clock, control)
    pair.b.engine.set(EngineState.DEAD, "connection refused")
    await pair.run(60.0)
    assert store.leader is None, "nobody can serve"
    assert control.calls == []
    assert "until another node is the healthy primary" in pair.a.ha.status().engine_restart


async def test_paused_or_switched_off_means_no_restart(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    pair = await hung_primary(store, clock, control)
    store.paused = True
    await pair.run(20.0)
    assert control.calls == [] and "paused" in pair.a.ha.status().engine_restart
    store.paused = False
    pair.a.ha.s = pair.a.ha.s.model_copy(update={"engine_auto_restart": False})
    await pair.run(20.0)
    assert control.calls == [] and "is off" in pair.a.ha.status().engine_restart


async def test_no_automatic_restart_while_the_operators_runs(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    pair = await hung_primary(store, clock, control)
    control.busy = True
    await pair.run(20.0)
    assert control.calls == [] and pair.restarts() == []
    assert "already under way" in pair.a.ha.status().engine_restart


async def test_sidecar_cannot_restart_and_says_so(store: FakeStore, clock: FakeClock) -> None:
    pair = await hung_primary(store, clock, None)
    await pair.run(20.0)
    assert "not ours to restart (sidecar)" in pair.a.ha.status().engine_restart
    assert pair.restarts() == []


async def test_restarts_are_damped_and_limited_per_window(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    pair = await hung_primary(store, clock, control)
    waits = []
    for _ in range(3):
        hung_at = pair.a.engine.health.since
        before = len(control.calls)
        while len(control.calls) == before:
            await pair.run(0.5)
            assert clock() - hung_at < 100, "never restarted"
        waits.append(clock() - hung_at)
        # The new engine hangs again at once.
        pair.a.engine.set(EngineState.DEAD, "process EXITED")
        pair.a.engine.set(EngineState.HUNG, "canary timed out after 2s")
    # Each restart already made doubles the wait: 10, 20, 40 s (to a 0.5 s tick).
    assert [round(w) for w in waits] == [10, 20, 40]
    await pair.run(300.0)
    assert len(control.calls) == 3, "more restarts than engine_restart_limit"
    exhausted = [e for e in pair.restarts() if e.startswith(ev.ENGINE_AUTO_RESTART_EXHAUSTED)]
    assert exhausted == [
        "ENGINE_AUTO_RESTART_EXHAUSTED sglang-01: engine hung; gave up: 3 automatic"
        " restarts in the last 3600s (restart it by hand)"
    ]
    # Once the window has passed, it may try again.
    await pair.run(3600.0)
    assert len(control.calls) == 4


async def test_a_failed_restart_is_logged_counted_and_retried_later(
    store: FakeStore, clock: FakeClock, control: FakeControl
) -> None:
    metrics = AgentMetrics()
    pair = await hung_primary(store, clock, control)
    metrics.attach_restarter(pair.restarter)
    control.fail = "supervisord did not start a new engine in time"
    while not control.calls:
        await pair.run(0.5)
    failed_at = clock()
    assert pair.restarts()[-1] == (
        "ENGINE_AUTO_RESTART_FAILED sglang-01: supervisord did not start a new engine in time"
    )
    control.fail = None
    while len(control.calls) == 1:
        await pair.run(0.5)
    assert clock() - failed_at == 20.0, "the second try waits twice as long, from the first"
    text = generate_latest(metrics.registry).decode()
    assert 'sglang_ha_engine_auto_restarts_total{node="sglang-01",outcome="failed"} 1.0' in text
    assert 'sglang_ha_engine_auto_restarts_total{node="sglang-01",outcome="ok"} 1.0' in text


class FakeSupervisor:
    """supervisord's XML-RPC as the engine program sees it: KILL ends the process,
    autorestart starts a new one after `restart_polls` reads (None: never)."""

    def __init__(self, restart_polls: int | None = 2) -> None:
        self.pid, self.state = 100, "RUNNING"
        self.signals: list[str] = []
        self.started = 0
        self.restart_polls = restart_polls
        self._polls = 0

    def getProcessInfo(self, name: str) -> dict[str, Any]:
        if self.state == "EXITED" and self.restart_polls is not None:
            self._polls += 1
            if self._polls >= self.restart_polls:
                self.pid, self.state = self.pid + 1, "STARTING"
        return {"pid": self.pid if self.state != "EXITED" else 0, "statename": self.state}

    def signalProcess(self, name: str, sig: str) -> bool:
        if self.state != "RUNNING":
            raise xmlrpc.client.Fault(70, "NOT_RUNNING")
        self.signals.append(sig)
        self.state = "EXITED"
        return True

    def startProcess(self, name: str, wait: bool) -> bool:
        self.started += 1
        self.pid, self.state = self.pid + 1, "RUNNING"
        return True


class _Rpc:
    def __init__(self, supervisor: FakeSupervisor) -> None:
        self.supervisor = supervisor


def control_over(supervisor: FakeSupervisor) -> EngineControl:
    control = EngineControl("/nonexistent.sock", "engine")
    control._rpc = lambda: _Rpc(supervisor)  # type: ignore[method-assign]
    return control


async def test_kill_and_start_kills_at_once_and_waits_for_the_new_process() -> None:
    supervisor = FakeSupervisor(restart_polls=2)
    pid = await control_over(supervisor).kill_and_start(timeout=5.0)
    # SIGKILL, not a stop: SGLang's SIGTERM drain would wait on the hung requests.
    assert supervisor.signals == ["KILL"]
    assert pid == 101 and supervisor.started == 0, "supervisord's autorestart started it"


async def test_kill_and_start_starts_it_when_supervisord_does_not() -> None:
    supervisor = FakeSupervisor(restart_polls=None)
    pid = await control_over(supervisor).kill_and_start(timeout=5.0)
    assert supervisor.started == 1 and pid == 101


async def test_one_restart_at_a_time() -> None:
    control = control_over(FakeSupervisor())
    control.busy = True
    with pytest.raises(EngineControlError, match="already under way"):
        await control.kill_and_start(timeout=1.0)


def test_status_table_says_why_a_hung_engine_is_or_is_not_restarted() -> None:
    note = "engine hung for 4s; restart after 10s (sglang-02 serves)"
    rows = [
        NodeRow(
            "sglang-01",
            "http://sglang-01:8008",
            agent_status(
                "sglang-01", engine=EngineState.HUNG, engine_restart=note, engine_restarts=1
            ),
        ),
        NodeRow("sglang-02", "http://sglang-02:8008", agent_status("sglang-02", Role.PRIMARY)),
    ]
    view = ClusterView(Cluster(Leader("sglang-02", 2, 2000), max_epoch=2), None, rows)
    lines = output.status_table(view).splitlines()
    assert lines[-1] == f"sglang-01: {note} (1 automatic restart(s) lately)"
    assert not any(line.startswith("sglang-02:") for line in lines)
