"""Cluster-wide dynamic settings (edit-config): validated before they are stored,
applied by the agent's next cycle and by the relay, each change an event with its
diff; and the agent routes behind `sglang-ha restart` and `sglang-ha remove`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.config import (
    DYNAMIC_SETTINGS,
    AgentSettings,
    DynamicConfig,
    FailbackSettings,
    LeaseTiming,
    RelaySettings,
)
from ha_agent.dcs.base import Member
from ha_agent.node.api import AgentApi
from ha_agent.node.engine_control import EngineControl, EngineControlError
from tests.support.fakes import agent_status
from tests.unit.test_api_agent import AUTH, AgentFixture, get_ok, make_agent


@pytest.fixture
async def agent() -> AgentFixture:
    a = make_agent()
    await a.ha.run_cycle()  # primary, epoch 1
    return a


@pytest.fixture
async def client(agent: AgentFixture) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(agent.api.app())) as c:
        yield c


# -- the schema ------------------------------------------------------------------------------


def test_dynamic_settings_are_exactly_those_marked_dynamic() -> None:
    marked = {
        name
        for cls in (LeaseTiming, FailbackSettings, RelaySettings)
        for name, field in cls.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("dynamic")
    }
    assert marked == set(DYNAMIC_SETTINGS)


def test_a_config_breaking_the_timing_rule_is_refused_not_adjusted() -> None:
    settings = AgentSettings(redis_url="redis://unused")
    with pytest.raises(ValueError, match=r"loop_wait \+ 2\*retry_timeout <= lease_ttl"):
        DynamicConfig(lease_ttl=1.0).applied_to(settings)
    with pytest.raises(ValueError, match="safety_margin < lease_ttl - loop_wait"):
        DynamicConfig(safety_margin=2.0).applied_to(settings)
    applied = DynamicConfig(lease_ttl=4.0, warm_rate=0.0).applied_to(settings)
    assert applied.lease_ttl == 4.0 and applied.loop_wait == settings.loop_wait
    assert not hasattr(applied, "warm_rate"), "a relay setting does not leak into the agent's"


def test_diff_names_each_change() -> None:
    old = DynamicConfig(lease_ttl=3.0, failback="never")
    new = DynamicConfig(failback="preferred", warm_rate=1.0)
    assert old.diff(new) == [
        "lease_ttl: 3.0 -> -",
        "failback: never -> preferred",
        "warm_rate: - -> 1.0",
    ]


# -- the agent applies it --------------------------------------------------------------------


async def test_the_next_cycle_applies_the_stored_config(
    agent: AgentFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ha_agent.node.ha")
    agent.store.config_json = DynamicConfig(lease_ttl=4.0, failback="preferred").to_json()
    await agent.ha.run_cycle()
    assert agent.ha.s.lease_ttl == 4.0 and agent.ha.failback.s.failback == "preferred"
    status = agent.ha.status()
    assert status.lease_ttl == 4.0 and status.failback == "preferred"
    # Renewed under the new TTL: more lease left than 2.5 s could give.
    assert status.lease_time_left == pytest.approx(4.0 - agent.ha.s.safety_margin)
    assert "dynamic config applied: lease_ttl 2.5 -> 4.0, failback never -> preferred" in (
        caplog.text
    )
    # Unset again: back to the environment's values.
    agent.store.config_json = "{}"
    await agent.ha.run_cycle()
    assert agent.ha.s.lease_ttl == 2.5 and agent.ha.s.failback == "never"


async def test_an_unreadable_stored_config_keeps_the_settings_in_effect(
    agent: AgentFixture, caplog: pytest.LogCaptureFixture
) -> None:
    agent.store.config_json = DynamicConfig(lease_ttl=4.0).to_json()
    await agent.ha.run_cycle()
    agent.store.config_json = '{"lease_ttl": -1}'
    await agent.ha.run_cycle()
    await agent.ha.run_cycle()
    assert agent.ha.s.lease_ttl == 4.0
    assert caplog.text.count("dynamic config in the store is unreadable") == 1


# -- /ha/config ------------------------------------------------------------------------------


async def test_config_route_validates_stores_and_records_the_diff(
    client: TestClient, agent: AgentFixture
) -> None:
    body = await get_ok(client, "/ha/config")
    assert body["config"] == {} and body["effective"]["lease_ttl"] == 2.5
    r = await client.post(
        "/ha/config", json={"config": {"lease_ttl": 4, "failback": "preferred"}}, headers=AUTH
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["diff"] == ["lease_ttl: - -> 4.0", "failback: - -> preferred"]
    assert agent.store.config_json == '{"failback":"preferred","lease_ttl":4.0}'
    event = agent.ha.events.recent[-1]
    assert (event.event, event.detail) == (
        "CONFIG_CHANGED",
        "lease_ttl: - -> 4.0, failback: - -> preferred (by admin)",
    )


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"lease_ttl": 1.0}, "loop_wait + 2*retry_timeout <= lease_ttl"),
        ({"safety_margin": 5}, "safety_margin < lease_ttl - loop_wait"),
        ({"failback": "sometimes"}, "failback: Input should be 'never', 'negotiated'"),
        ({"lease_ttl": 0}, "lease_ttl: Input should be greater than 0"),
        ({"node_name": "x"}, "node_name: Extra inputs are not permitted"),
        ("lease_ttl=3", "config: Input should be a valid dictionary"),
    ],
)
async def test_config_route_refuses_with_the_rule_it_breaks(
    client: TestClient, agent: AgentFixture, config: Any, says: str
) -> None:
    r = await client.post("/ha/config", json={"config": config}, headers=AUTH)
    assert r.status == 422
    assert says in (await r.json())["detail"]
    assert agent.store.config_json == "{}", "nothing was stored"


async def test_config_route_refuses_a_stale_edit(client: TestClient, agent: AgentFixture) -> None:
    agent.store.config_json = DynamicConfig(warm_rate=1.0).to_json()
    r = await client.post(
        "/ha/config", json={"config": {"loop_wait": 0.4}, "previous": {}}, headers=AUTH
    )
    assert r.status == 409 and "changed meanwhile" in (await r.json())["detail"]
    assert agent.store.config_json == '{"warm_rate":1.0}'


# -- /ha/restart-engine ----------------------------------------------------------------------


class FakeControl(EngineControl):
    def __init__(self, fail: bool = False) -> None:
        super().__init__("/nonexistent.sock", "engine")
        self.fail = fail
        self.restarts = 0

    async def restart(self, timeout: float = 90.0, hung: bool = False) -> int:
        if self.fail:
            raise EngineControlError("supervisord: no such socket")
        self.restarts += 1
        return 4242


def _with_control(agent: AgentFixture, control: EngineControl | None) -> TestClient:
    api = AgentApi(agent.ha, agent.metrics, agent.api.auth, control)
    return TestClient(TestServer(api.app()))


async def test_restart_is_refused_on_the_primary_and_done_on_a_standby(
    agent: AgentFixture,
) -> None:
    control = FakeControl()
    async with _with_control(agent, control) as c:
        r = await c.post("/ha/restart-engine", headers=AUTH)
        assert r.status == 409 and "is the primary: switch over first" in (await r.json())["detail"]
        assert control.restarts == 0
        await agent.ha._release("test", planned=True)  # now a standby
        r = await c.post("/ha/restart-engine", headers=AUTH)
        assert r.status == 200 and (await r.json())["pid"] == 4242
        assert control.restarts == 1
        assert agent.ha.events.recent[-1].event == "ENGINE_RESTART_REQUESTED"


async def test_restart_without_supervisord_says_why(agent: AgentFixture) -> None:
    await agent.ha._release("test", planned=True)
    async with _with_control(agent, None) as c:
        r = await c.post("/ha/restart-engine", headers=AUTH)
        assert r.status == 409 and "sidecar" in (await r.json())["detail"]
    async with _with_control(agent, FakeControl(fail=True)) as c:
        r = await c.post("/ha/restart-engine", headers=AUTH)
        assert r.status == 503 and "no such socket" in (await r.json())["detail"]


async def test_a_planned_restart_does_not_count_as_a_flap(agent: AgentFixture) -> None:
    from ha_agent.dcs.base import EngineState

    engine = agent.ha.engine
    for _ in range(3):
        agent.ha.expect_engine_restart(60)
        engine.set(EngineState.DEAD)  # type: ignore[attr-defined]
        engine.set(EngineState.HEALTHY)  # type: ignore[attr-defined]
    assert agent.ha.damper.held_back_for() == 0
    engine.set(EngineState.DEAD)  # type: ignore[attr-defined]  # unplanned
    engine.set(EngineState.HEALTHY)  # type: ignore[attr-defined]
    engine.set(EngineState.DEAD)  # type: ignore[attr-defined]
    assert agent.ha.damper.held_back_for() > 0


# -- /ha/remove ------------------------------------------------------------------------------


async def a_registered_peer(agent: AgentFixture) -> Member:
    """sglang-02 in the store, and seen by the primary's next cycle."""
    peer = Member("sglang-02", "http://sglang-02:30000", "http://sglang-02:8008")
    await agent.store.register(peer, ttl=60)
    await agent.ha.run_cycle()
    return peer


async def test_remove_refuses_the_primary_and_a_running_node(
    client: TestClient, agent: AgentFixture
) -> None:
    peer = await a_registered_peer(agent)
    r = await client.post("/ha/remove", json={"node": "sglang-01"}, headers=AUTH)
    assert r.status == 409 and "is the primary" in (await r.json())["detail"]
    agent.ha.peers.statuses[peer.api_url] = agent_status("sglang-02")  # type: ignore[attr-defined]
    r = await client.post("/ha/remove", json={"node": "sglang-02"}, headers=AUTH)
    assert r.status == 409 and "still runs" in (await r.json())["detail"]
    r = await client.post("/ha/remove", json={"node": "nobody"}, headers=AUTH)
    assert r.status == 404


async def test_remove_forgets_a_stopped_node_everywhere(
    client: TestClient, agent: AgentFixture
) -> None:
    await a_registered_peer(agent)
    assert "sglang-02" in agent.ha.state.known_peers
    r = await client.post("/ha/remove", json={"node": "sglang-02"}, headers=AUTH)
    assert r.status == 200, await r.text()
    assert "sglang-02" not in agent.store.members
    assert "removed sglang-02" in agent.store.notifications, "the relay is told"
    # No longer a peer whose failsafe ack the primary needs when the store is away.
    assert "sglang-02" not in agent.ha.state.known_peers
    assert agent.ha.events.recent[-1].event == "NODE_REMOVED"


# -- the relay -------------------------------------------------------------------------------


async def test_the_relay_applies_the_warming_rate_and_forgets_removed_nodes() -> None:
    from ha_agent.gateway.service import RelayService
    from tests.support.fakes import FakeClock, FakeStore

    store = FakeStore(FakeClock())
    settings = RelaySettings(
        redis_url="redis://unused",
        warm_rate=2.0,
        ha_log="",
        nodes=["sglang-02=http://sglang-02:30000=http://sglang-02:8008"],
    )
    service = RelayService(settings, store=store)
    try:
        store.config_json = DynamicConfig(warm_rate=0.5).to_json()
        await service.topology.refresh()
        assert service.warmer.rate == 0.5
        store.config_json = "{}"
        await service.topology.refresh()
        assert service.warmer.rate == 2.0, "unset: back to the environment's rate"
        # A seed node too leaves the view when the operator removes it.
        service.topology.forget("sglang-02")
        assert "sglang-02" not in service.topology.nodes
    finally:
        await service.transport.close()
        if service.topology._session is not None:
            await service.topology._session.close()
        service.events.close()
