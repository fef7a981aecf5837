"""The gateway's public inference API and the relay's admin API, fuzzed from their
OpenAPI documents (schemathesis, offline).

The relay is real, in front of two in-process simulators (test_hardening_relay's
rig); schemathesis sends what the documents allow and what they do not. Whatever
arrives: no 5xx (both engines are healthy, so even a 503 would be a bug), no hang,
only documented status codes; what the document calls invalid is refused; and the
relay's view of the nodes is the same afterwards.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    status_code_conformance,
)

from ha_agent.gateway.admin import RelayAdmin
from ha_agent.openapi.relay import ADMIN_SPEC, INFERENCE_SPEC
from tests.unit.test_fuzz_agent_api import serve_in_thread
from tests.unit.test_hardening_relay import RelayRig, start_rig

EXAMPLES = 25


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    assert response.status_code < 500, (
        f"{case.method} {case.path}: HTTP {response.status_code}: {response.text[:300]}"
    )
    return None


_config = SchemathesisConfig.from_dict(
    {"generation": {"mode": "all", "max-examples": EXAMPLES, "allow-extra-parameters": False}}
)
inference = schemathesis.openapi.from_dict(INFERENCE_SPEC, config=_config)
admin = schemathesis.openapi.from_dict(ADMIN_SPEC, config=_config)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


class Rig:
    """The relay rig on its own loop in a thread (schemathesis calls synchronously)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-relay", daemon=True)
        self.rig: RelayRig | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.rig = self.loop.run_until_complete(
            start_rig(startup_delay=0.0, itl=0.0005, ttft_base=0.0)
        )
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> Rig:
        self._thread.start()
        assert self._ready.wait(timeout=60), "relay rig did not start"
        return self

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.rig is not None
            await self.rig.close()

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(scope="module")
def rig(sim_env_module: None) -> Iterator[Rig]:
    with Rig() as r:
        yield r


@pytest.fixture(scope="module")
def sim_env_module() -> Iterator[None]:
    """No SIM_* variable from the outer environment reaches the simulators."""
    mp = pytest.MonkeyPatch()
    import os

    for key in list(os.environ):
        if key.startswith("SIM_"):
            mp.delenv(key)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def relay_url(rig: Rig) -> str:
    assert rig.rig is not None
    return str(rig.rig.client.make_url("")).rstrip("/")


@pytest.fixture(scope="module")
def view_before(rig: Rig) -> list[tuple[str, bool, bool, str]]:
    assert rig.rig is not None
    return rig.rig.view()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@inference.parametrize()
@FUZZ
def test_fuzz_public_inference_api(
    case: Any, relay_url: str, http: requests.Session, view_before: Any, rig: Rig
) -> None:
    response = case.call(base_url=relay_url, session=http, timeout=20)
    case.validate_response(
        response,
        checks=[
            no_server_error,
            status_code_conformance,
            content_type_conformance,
            negative_data_rejection,
        ],
    )
    assert rig.rig is not None and rig.rig.view() == view_before


@pytest.fixture(scope="module")
def admin_url(rig: Rig) -> Iterator[str]:
    assert rig.rig is not None
    relay = rig.rig.relay
    for served in serve_in_thread(lambda: RelayAdmin(relay.topology, relay.metrics).app()):
        yield served.url


@admin.parametrize()
@FUZZ
def test_fuzz_relay_admin_api(case: Any, admin_url: str, http: requests.Session) -> None:
    response = case.call(base_url=admin_url, session=http, timeout=10)
    case.validate_response(
        response,
        checks=[status_code_conformance, content_type_conformance, negative_data_rejection],
    )
    assert response.status_code != 500
