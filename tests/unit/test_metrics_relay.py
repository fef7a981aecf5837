"""The relay's /metrics for what needs no engine: rejections and the topology view.

Traffic that reaches engines (outcomes, retries, migrations, TTFT) is measured against
real simulators in test_relay.py and against the live stack in
tests/integration/test_observability.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.config import RelaySettings
from ha_agent.events import EventLog
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.stream.relay import _RETRY_LABEL, Relay
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import FailureCause, Transport, classify
from tests.support.fakes import FakeClock, FakeStore

SEEDS = ["sglang-01=http://a:30000=http://a:8008", "sglang-02=http://b:30000=http://b:8008"]


@pytest.fixture
async def relay() -> AsyncIterator[tuple[TestClient, RelayMetrics, Topology]]:
    settings = RelaySettings(nodes=SEEDS)
    topology = Topology(settings, FakeStore(FakeClock()), EventLog(None, "relay"))
    metrics = RelayMetrics()
    metrics.attach(topology)
    transport = Transport(connect_timeout=0.5, first_byte_timeout=5.0)
    app = Relay(settings, topology, transport, metrics, EventLog(None, "relay")).app()
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client, metrics, topology
    await client.close()
    await transport.close()


def value(metrics: RelayMetrics, metric: str, /, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(metric, labels)


async def test_rejected_requests_are_counted_and_timed(
    relay: tuple[TestClient, RelayMetrics, Topology],
) -> None:
    client, metrics, _ = relay
    for _ in range(2):
        r = await client.post("/v1/chat/completions", data=b"{not json")
        assert r.status == 400
    assert (
        value(
            metrics,
            "sglang_ha_relay_requests_total",
            endpoint="chat",
            node="-",
            outcome="client_error",
            code="400",
        )
        == 2
    )
    # Timed too: the 4xx latency heatmap shows them.
    assert (
        value(
            metrics,
            "sglang_ha_relay_request_duration_seconds_count",
            endpoint="chat",
            stream="false",
            code="400",
        )
        == 2
    )


async def test_the_topology_view(relay: tuple[TestClient, RelayMetrics, Topology]) -> None:
    _, metrics, topology = relay
    assert value(metrics, "sglang_ha_relay_primary", node="sglang-01") == 0
    topology.primary, topology.epoch = "sglang-01", 7
    assert value(metrics, "sglang_ha_relay_primary", node="sglang-01") == 1
    assert value(metrics, "sglang_ha_relay_primary", node="sglang-02") == 0
    assert value(metrics, "sglang_ha_relay_epoch") == 7
    assert value(metrics, "sglang_ha_relay_degraded") == 0
    assert value(metrics, "sglang_ha_relay_leader_changes_total") == 0


# docs/observability.md: sglang_ha_relay_retries_total's reasons.
DOCUMENTED_RETRY_REASONS = {
    "connect",
    "node_failed",
    "timeout",
    "closed",
    "broken",
    "http_5xx",
    "truncated",
    "continuation_refused",
    "engine_abort",
    "other",
}


def test_every_failure_kind_has_a_documented_retry_reason() -> None:
    assert set(_RETRY_LABEL) == set(FailureCause)
    assert set(_RETRY_LABEL.values()) <= DOCUMENTED_RETRY_REASONS


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (aiohttp.ServerDisconnectedError(), "connect"),
        (ConnectionResetError(104, "reset"), "connect"),
        (asyncio.TimeoutError(), "timeout"),
        (aiohttp.ConnectionTimeoutError("Connection timeout to host http://a:30000"), "timeout"),
        (aiohttp.ClientPayloadError("payload not completed"), "broken"),
        (aiohttp.InvalidURL("x"), "other"),
    ],
)
def test_a_failure_is_counted_by_its_kind(exc: BaseException, reason: str) -> None:
    assert _RETRY_LABEL[classify(exc).cause] == reason
