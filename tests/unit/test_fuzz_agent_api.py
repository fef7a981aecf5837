"""The agent's REST API fuzzed from its OpenAPI document (schemathesis, offline).

A real agent API (the in-memory store and engine of test_api_agent.py) serves on a
local port; schemathesis sends what the document allows and what it does not
(positive and negative generation). Whatever arrives: no 500, no crash, no hang,
only documented status codes, JSON where JSON is promised, and without the token
nothing but 401.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from ha_agent.openapi.agent import AGENT_SPEC
from tests.unit.test_api_agent import AUTH, make_agent

EXAMPLES = 30  # per operation and generation mode: about 1,500 requests, a few seconds


@dataclass
class Served:
    url: str
    loop: asyncio.AbstractEventLoop


def serve_in_thread(build: Callable[[], web.Application]) -> Iterator[Served]:
    """Run `build()`'s app on a free loopback port, on its own loop in a thread
    (schemathesis calls synchronously); stop it afterwards."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(build(), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["runner"] = runner
        box["port"] = runner.addresses[0][1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fuzz-server", daemon=True)
    thread.start()
    assert started.wait(timeout=30), "test server did not start"
    try:
        yield Served(f"http://127.0.0.1:{box['port']}", loop)
    finally:
        asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """5xx only where the API promises one (503 for a health answer that is 'no' or a
    store that is down), never a 500 or anything undocumented."""
    if response.status_code >= 500:
        documented = case.operation.definition.raw.get("responses", {})
        assert str(response.status_code) in documented, (
            f"{case.method} {case.path}: HTTP {response.status_code}: {response.text[:300]}"
        )
    return None


def json_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code >= 400:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.startswith("application/json"), response.headers
        assert isinstance(response.json(), dict)  # the document says which fields
    return None


CHECKS = [
    no_server_error,
    json_errors,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

# Unknown query parameters are ignored, as by any HTTP API: not generated as "invalid".
_config = SchemathesisConfig.from_dict(
    {
        "generation": {
            "mode": "all",
            "max-examples": EXAMPLES,
            "allow-extra-parameters": False,
        }
    }
)
schema = schemathesis.openapi.from_dict(AGENT_SPEC, config=_config)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same requests on every run: a failure is reproducible
    database=None,
)


@pytest.fixture(scope="module")
def agent_url() -> Iterator[str]:
    async def promoted() -> web.Application:
        a = make_agent()
        await a.ha.run_cycle()  # primary, epoch 1
        return a.api.app()

    app_box: dict[str, web.Application] = {}

    def build() -> web.Application:
        return app_box["app"]

    loop = asyncio.new_event_loop()
    try:
        app_box["app"] = loop.run_until_complete(promoted())
    finally:
        loop.close()
    yield from (s.url for s in serve_in_thread(build))


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@schema.parametrize()
@FUZZ
def test_fuzz_agent_api_with_the_token(case: Any, agent_url: str, http: requests.Session) -> None:
    response = case.call(base_url=agent_url, session=http, headers=AUTH, timeout=10)
    case.validate_response(response, checks=CHECKS)


@schema.include(method="POST").parametrize()
@FUZZ
def test_fuzz_agent_admin_without_the_token_is_always_401(
    case: Any, agent_url: str, http: requests.Session
) -> None:
    headers = {"Authorization": "Bearer not-the-token"}
    response = case.call(base_url=agent_url, session=http, headers=headers, timeout=10)
    if response.request.method != "POST":  # negative generation also tries other methods
        assert response.status_code == 405, (case.path, response.status_code, response.text)
        return
    assert response.status_code == 401, (case.path, response.status_code, response.text)
    assert response.json() == {"detail": "missing or wrong admin token"}
