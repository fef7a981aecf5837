"""Settings: environment overrides, lists from comma-separated values, timing checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ha_agent.config import AgentSettings, HaMode, LeaseTiming, RelaySettings, TimingWarning


def test_environment_overrides_and_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HA_NODE_NAME", "sglang-07")
    monkeypatch.setenv("HA_SENTINELS", "s1:26379, s2:26380,s3")
    monkeypatch.setenv("HA_PEERS", "http://a:8008,http://b:8008")
    monkeypatch.setenv("HA_LEASE_TTL", "5")
    monkeypatch.setenv("HA_REDIS_PASSWORD", "pw")
    s = AgentSettings()
    assert s.node_name == "sglang-07"
    assert s.sentinel_addresses() == [("s1", 26379), ("s2", 26380), ("s3", 26379)]
    assert s.peers == ["http://a:8008", "http://b:8008"]
    assert s.lease_ttl == 5.0
    assert s.redis_password is not None and s.redis_password.get_secret_value() == "pw"
    assert "pw" not in repr(s), "secrets never appear in logs or reprs"


def test_relay_seed_nodes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HA_NODES", "a=http://a:30000=http://a:8008,b=http://b:30000=http://b:8008")
    assert RelaySettings().nodes == [
        "a=http://a:30000=http://a:8008",
        "b=http://b:30000=http://b:8008",
    ]


def test_mode_is_pair_unless_set_and_one_setting_for_agent_and_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert AgentSettings().mode is HaMode.PAIR and RelaySettings().mode is HaMode.PAIR
    monkeypatch.setenv("HA_MODE", "pool")
    assert AgentSettings().mode is HaMode.POOL and RelaySettings().mode is HaMode.POOL
    monkeypatch.setenv("HA_MODE", "ring")
    with pytest.raises(ValidationError, match="'pair' or 'pool'"):
        RelaySettings()


def test_patroni_timing_rule_is_enforced_with_a_warning() -> None:
    with pytest.warns(TimingWarning, match="retry_timeout lowered"):
        t = LeaseTiming(lease_ttl=2.0, loop_wait=1.0, retry_timeout=1.0)
    assert t.loop_wait + 2 * t.retry_timeout <= t.lease_ttl


def test_defaults_let_a_standby_take_over_within_three_seconds() -> None:
    t = LeaseTiming()
    # Worst case: the lease was renewed just before the primary died, then expires,
    # then the standby's next cycle sees it free.
    assert t.lease_ttl + t.loop_wait <= 3.0
    assert t.loop_wait + 2 * t.retry_timeout <= t.lease_ttl


def test_invalid_values_are_refused() -> None:
    with pytest.raises(ValueError):
        LeaseTiming(lease_ttl=-1)
    with pytest.raises(ValueError):
        AgentSettings(failback="sometimes")  # type: ignore[arg-type]
