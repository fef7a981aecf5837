"""SGLang's --admin-api-key: with it set, admin routes (/abort_request included) accept
only that key (python/sglang/srt/utils/auth.py `decide_request_auth`, ADMIN_OPTIONAL).
The agent's canary abort and the relay's client abort present it when configured, and
say loudly in the log why an abort got 401 when it is not.

Against the simulator, which applies SGLang's rule (`server.auth_allows`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ha_agent.config import AgentSettings, SimSettings
from ha_agent.node.engine.client import EngineClient
from ha_agent.sim.server import create_app
from tests.support.fakes import relay_over
from tests.unit.conftest import SIM_FAST

API, ADMIN = "engine-api-key", "engine-admin-key"
LONG = {"max_new_tokens": 300, "ignore_eos": True}


async def start_sims(n: int) -> list[TestClient]:
    sims = []
    for _ in range(n):
        settings = SimSettings(**{**SIM_FAST, "itl": 0.004, "api_key": API, "admin_api_key": ADMIN})
        client = TestClient(TestServer(create_app(settings)))
        await client.start_server()
        sims.append(client)
    return sims


@pytest.fixture
async def sim(sim_env_clean: None) -> AsyncIterator[TestClient]:
    (client,) = await start_sims(1)
    yield client
    await client.close()


def agent_client(url: str, tmp_path: Path, admin: bool) -> EngineClient:
    (tmp_path / "engine_api_key").write_text(API)
    (tmp_path / "engine_admin_api_key").write_text(ADMIN + "\n")
    settings = AgentSettings(
        engine_api_key_file=str(tmp_path / "engine_api_key"),
        engine_admin_api_key_file=str(tmp_path / "engine_admin_api_key") if admin else None,
    )
    return EngineClient(url, settings.engine_headers(), settings.engine_admin_headers())


async def last_event(resp: Any) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for event in (await resp.read()).split(b"\n\n"):
        if event.startswith(b"data: {"):
            last = json.loads(event[6:])
    return last


@pytest.mark.parametrize("admin", [True, False])
async def test_agent_abort_presents_the_admin_key_or_says_why_it_failed(
    sim: TestClient, tmp_path: Path, admin: bool, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{sim.server.port}"
    client = agent_client(url, tmp_path, admin)
    body = {"text": "long", "rid": "canary-x", "stream": True, "sampling_params": LONG}
    headers = {"Authorization": f"Bearer {API}"}
    async with sim.post("/generate", json=body, headers=headers) as stream:
        assert stream.status == 200
        await stream.content.readuntil(b"\n\n")  # running
        with caplog.at_level(logging.ERROR, logger="ha_agent.node.engine.client"):
            await client.abort("canary-x")
        last = await last_event(stream)
    await client.close()
    reason = last["meta_info"]["finish_reason"]["type"]
    if admin:
        assert reason == "abort"
        assert not caplog.records
    else:
        assert reason == "length", "the engine refused the abort"
        assert "refused the abort of canary canary-x with 401" in caplog.text
        assert "HA_ENGINE_ADMIN_API_KEY_FILE" in caplog.text


@pytest.mark.parametrize("admin", [True, False])
async def test_relay_client_abort_presents_the_admin_key_or_says_why_it_failed(
    sim_env_clean: None, admin: bool, caplog: pytest.LogCaptureFixture
) -> None:
    sims = await start_sims(2)
    keys: dict[str, Any] = {"engine_api_key": API}
    if admin:
        keys["engine_admin_api_key"] = ADMIN
    relay = relay_over([f"http://127.0.0.1:{s.server.port}" for s in sims], **keys)
    client = TestClient(TestServer(relay.app()))
    await client.start_server()
    try:
        owner = {"Authorization": "Bearer alice"}
        body = {"text": "long", "rid": "mine", "stream": True, "sampling_params": LONG}
        async with client.post("/generate", json=body, headers=owner) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
            with caplog.at_level(logging.ERROR, logger="ha_agent.gateway.stream.relay"):
                r = await client.post("/abort_request", json={"rid": "mine"}, headers=owner)
                assert r.status == 200
            last = await last_event(stream)
    finally:
        await relay.transport.close()
        await client.close()
        for s in sims:
            await s.close()
    reason = last["meta_info"]["finish_reason"]["type"]
    if admin:
        assert reason == "abort"
        assert "401" not in caplog.text
    else:
        assert reason == "length"
        assert "refused a client's abort with 401" in caplog.text


def test_admin_headers_fall_back_to_the_api_key() -> None:
    settings = AgentSettings(engine_api_key=API)
    assert settings.engine_admin_headers() == {"Authorization": f"Bearer {API}"}
    assert AgentSettings().engine_admin_headers() == {}
