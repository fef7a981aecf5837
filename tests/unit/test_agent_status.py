"""The agent's /ha/status as one typed value: what the agent serves is what its
readers (peers, relay, CLI) parse, and anything else is refused whole."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ha_agent.dcs.base import AgentStatus, Role, Transition
from tests.support.fakes import agent_status


def test_round_trip_through_json() -> None:
    status = agent_status(
        "sglang-01",
        Role.PRIMARY,
        epoch=7,
        lease_time_left=1.25,
        queued=3.0,
        last_transition=Transition(1.0, "promoted"),
    )
    wire = json.loads(json.dumps(status.to_json()))
    assert wire["role"] == "primary" and wire["engine"]["state"] == "healthy"
    assert AgentStatus.from_json(wire) == status
    assert status.is_primary


def test_a_primary_without_lease_time_is_not_counted_as_primary() -> None:
    assert not agent_status(role=Role.PRIMARY, lease_time_left=0.0).is_primary
    assert not agent_status(role=Role.FENCED, lease_time_left=1.0).is_primary


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"role": "leader"}, "leader"),
        ({"epoch": "3"}, "epoch"),
        ({"epoch": True}, "epoch"),
        ({"engine": {"state": "melting"}}, "melting"),
        ({"engine": None}, "engine"),
        ({"lease_time_left": "lots"}, "lease_time_left"),
        ({"failback": "sometimes"}, "failback"),
        ({"last_transition": "promoted"}, "last transition"),
    ],
)
def test_malformed_answers_are_refused(change: dict[str, Any], why: str) -> None:
    wire = agent_status().to_json() | change
    with pytest.raises(ValueError, match=why):
        AgentStatus.from_json(wire)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError):
        AgentStatus.from_json(["primary"])
