"""SGLang's --api-key, end to end on the HA side: the agent's canary and abort, the
relay's upstream requests and the warmer all present the engines' key.

The fake engine applies SGLang's rule (python/sglang/srt/utils/auth.py,
``decide_request_auth``): with a key set, everything but /health* and /metrics needs
``Authorization: Bearer <key>`` (else 401).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import ValidationError

from ha_agent.config import AgentSettings, RelaySettings
from ha_agent.gateway.upstream.transport import Transport, forward_headers
from ha_agent.node.engine.client import EngineClient
from tests.support.nginx_render import render_into

KEY = "engine-secret-key"


def sglang_auth_app(key: str) -> tuple[web.Application, list[tuple[str, str | None]]]:
    seen: list[tuple[str, str | None]] = []

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("Authorization")))
        exempt = request.path.startswith("/health") or request.path.startswith("/metrics")
        if not exempt and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"text": "x", "meta_info": {}})

    app = web.Application(middlewares=[auth])
    app.router.add_post("/generate", ok)
    app.router.add_post("/abort_request", ok)
    app.router.add_post("/v1/completions", ok)
    return app, seen


@pytest.fixture
async def engine() -> AsyncIterator[tuple[TestServer, list[tuple[str, str | None]]]]:
    app, seen = sglang_auth_app(KEY)
    server = TestServer(app)
    await server.start_server()
    yield server, seen
    await server.close()


def test_key_is_read_from_its_file_and_never_printed(tmp_path: Path) -> None:
    path = tmp_path / "engine_api_key"
    path.write_text(KEY + "\n")
    settings = AgentSettings(engine_api_key_file=str(path))
    assert settings.engine_headers() == {"Authorization": f"Bearer {KEY}"}
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    assert RelaySettings(engine_api_key_file=str(path)).engine_headers() == {
        "Authorization": f"Bearer {KEY}"
    }
    assert AgentSettings().engine_headers() == {}


@pytest.mark.parametrize("content", [None, ""])
def test_a_missing_or_empty_key_file_is_a_settings_error(
    tmp_path: Path, content: str | None
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError, match="engine_api_key_file"):
        AgentSettings(engine_api_key_file=str(path))


def test_key_and_key_file_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(KEY)
    with pytest.raises(ValidationError, match="not both"):
        AgentSettings(engine_api_key=KEY, engine_api_key_file=str(path))


async def test_canary_and_abort_carry_the_key(engine: tuple[TestServer, list]) -> None:
    server, seen = engine
    url = str(server.make_url("")).rstrip("/")
    without = EngineClient(url)
    with_key = EngineClient(url, AgentSettings(engine_api_key=KEY).engine_headers())
    try:
        refused = await without.canary(timeout=2.0)
        assert not refused.ok and "401" in refused.detail
        result = await with_key.canary(timeout=2.0)
        assert result.ok, result.detail
        await with_key.abort("some-rid")
    finally:
        await without.close()
        await with_key.close()
    assert ("/abort_request", f"Bearer {KEY}") in seen


async def test_relay_replaces_a_clients_authorization_with_the_engine_key(
    engine: tuple[TestServer, list],
) -> None:
    server, seen = engine
    transport = Transport(0.5, 5.0, RelaySettings(engine_api_key=KEY).engine_headers())
    # An OpenAI SDK always sends a key of its own, often a placeholder.
    client_headers = {"Authorization": "Bearer EMPTY", "Content-Type": "application/json"}
    try:
        async with transport.session.post(
            str(server.make_url("/v1/completions")),
            data=b"{}",
            headers=forward_headers(client_headers),
        ) as resp:
            assert resp.status == 200
        # The warmer posts through the same session with headers of its own.
        async with transport.session.post(
            str(server.make_url("/generate")),
            data=b"{}",
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200
    finally:
        await transport.close()
    assert seen == [("/v1/completions", f"Bearer {KEY}"), ("/generate", f"Bearer {KEY}")]


async def test_without_a_key_the_relay_sends_no_credentials(
    engine: tuple[TestServer, list],
) -> None:
    server, seen = engine
    transport = Transport(0.5, 5.0)
    try:
        async with transport.session.post(
            str(server.make_url("/v1/completions")),
            data=b"{}",
            headers=forward_headers({"Authorization": "Bearer EMPTY"}),
        ) as resp:
            assert resp.status == 401
    finally:
        await transport.close()
    assert seen == [("/v1/completions", None)]


@pytest.mark.parametrize("key", [KEY, None])
def test_nginx_last_resort_path_sends_the_engine_key_never_a_clients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    """Relay down, Nginx goes straight to the engines: it must present the key too."""
    from ha_agent.gateway.edge import nginx_conf

    conf = render_into(monkeypatch, tmp_path)
    monkeypatch.delenv("HA_ENGINE_API_KEY_FILE", raising=False)
    if key:
        monkeypatch.setenv("HA_ENGINE_API_KEY", key)
    else:
        monkeypatch.delenv("HA_ENGINE_API_KEY", raising=False)
    assert nginx_conf.main() == 0
    expected = f'"Bearer {key}"' if key else '""'
    assert f"proxy_set_header Authorization {expected};" in conf.read_text()
    assert conf.stat().st_mode & 0o077 == 0  # the key is the gateway user's alone
