"""The conformance checks (tests/conformance) against the CPU stack: straight at the
primary's engine (its container address) and through the gateway (Nginx, then the
relay), so the real Nginx template and the containers' settings are in the path."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conformance.checks import CHECKS, Target
from tests.conformance.test_conformance import Targets, assert_same_verdict
from tests.support.stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture
async def stack_targets(stack: Stack) -> AsyncIterator[Targets]:
    primary = stack.wait_stable()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield Targets(
            Target(
                "direct",
                stack.engine_url(primary),
                session,
                api_key=stack.secrets["HA_ENGINE_API_KEY"],
            ),
            # Presented whether or not the gateway requires it (on beyond loopback).
            Target("gateway", stack.gateway_url, session, api_key=stack.secrets["HA_CLIENT_KEY"]),
            real=False,  # the stack's engines are simulators
        )


@pytest.mark.parametrize("name", sorted(CHECKS))
async def test_same_verdict_on_the_stack(stack_targets: Targets, name: str) -> None:
    await assert_same_verdict(stack_targets, name)
