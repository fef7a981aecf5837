"""Every conformance check has the same verdict through the gateway as direct.

By default both targets are in-process: a simulator ("direct") and the relay in
front of it and a second simulator ("gateway"), as tests/unit/test_relay.py builds
them, so the suite runs in seconds in `make test`. Against a real deployment set
CONFORMANCE_DIRECT_URL (an engine) and CONFORMANCE_GATEWAY_URL (the gateway in
front of it; CONFORMANCE_GATEWAY_KEY, a client key, where it requires one):
`simulator-unsupported` rows must then agree both ways too. The in-process gateway
requires a client key (docs/security.md) and the checks present one.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.config import SimSettings
from ha_agent.gateway.stream.relay import Relay
from ha_agent.sim import create_app
from tests.conformance.checks import CHECKS, Target, run
from tests.support.fakes import relay_over

TABLE_FILE = Path(__file__).with_name("verdicts.md")
VERDICTS = ("pass", "model-specific", "simulator-unsupported", "intentionally-closed")
SIM = {
    "startup_delay": 0.0,
    "ttft_base": 0.001,
    "prefill_per_token": 0.0,
    "itl": 0.004,  # a 400-token answer takes long enough to be aborted mid-way
    "concurrency_slowdown": 0.0,
    "disconnect_abort_delay": 0.0,
    "context_length": 4096,
}


def read_table() -> dict[str, str]:
    rows = re.findall(r"^\| (\w+) \| .* \| ([a-z-]+) \|$", TABLE_FILE.read_text(), re.M)
    return {name: verdict for name, verdict in rows if name != "check"}


@dataclass
class Targets:
    direct: Target
    gateway: Target
    real: bool


# The in-process gateway's client key: SGLang's verdicts must hold with keys on.
CLIENT_KEY = "conformance-client-key-0123456789"


def client_key_file(folder: Path) -> Path:
    path = folder / "client_keys"
    path.write_text(f"conformance:{CLIENT_KEY}\n")
    return path


@pytest.fixture
async def targets(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Targets]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    direct_url = os.environ.get("CONFORMANCE_DIRECT_URL")
    gateway_url = os.environ.get("CONFORMANCE_GATEWAY_URL")
    clients: list[TestClient] = []
    relay: Relay | None = None
    try:
        if direct_url and gateway_url:
            key = os.environ.get("CONFORMANCE_GATEWAY_KEY")
            yield Targets(
                Target("direct", direct_url, session),
                Target("gateway", gateway_url, session, api_key=key),
                True,
            )
            return
        sims: dict[str, TestClient] = {}
        for name in ("sglang-01", "sglang-02"):
            c = TestClient(TestServer(create_app(SimSettings(**SIM))))
            await c.start_server()
            sims[name] = c
            clients.append(c)
        relay = relay_over(
            [f"http://127.0.0.1:{c.server.port}" for c in sims.values()],
            client_auth="on",
            client_keys_file=client_key_file(tmp_path_factory.mktemp("keys")),
        )
        gateway = TestClient(TestServer(relay.app()))
        await gateway.start_server()
        clients.append(gateway)
        primary = sims["sglang-01"]
        yield Targets(
            Target("direct", str(primary.make_url("")).rstrip("/"), session),
            Target("gateway", str(gateway.make_url("")).rstrip("/"), session, api_key=CLIENT_KEY),
            False,
        )
    finally:
        await session.close()
        if relay is not None:
            await relay.transport.close()
        for c in clients:
            await c.close()


def test_the_table_has_one_row_per_check() -> None:
    table = read_table()
    assert set(table) == set(CHECKS)
    assert set(table.values()) <= set(VERDICTS)


@pytest.mark.parametrize("name", sorted(CHECKS))
async def test_same_verdict_through_the_gateway_as_direct(targets: Targets, name: str) -> None:
    await assert_same_verdict(targets, name)


async def assert_same_verdict(targets: Targets, name: str) -> None:
    """The rule: the check's verdict in the table, the same both ways (the
    observations equal), but for the admin routes closed at the gateway."""
    expected = read_table()[name]
    direct, seen_direct = await run(CHECKS[name], targets.direct)
    gateway, seen_gateway = await run(CHECKS[name], targets.gateway)
    if expected == "intentionally-closed":
        assert direct == "pass", seen_direct
        assert gateway == "closed", seen_gateway
        return
    if expected == "simulator-unsupported" and not targets.real:
        assert (direct, gateway) == ("unsupported", "unsupported"), (seen_direct, seen_gateway)
        return
    assert direct == "pass", seen_direct
    assert gateway == "pass", seen_gateway
    assert seen_gateway == seen_direct
