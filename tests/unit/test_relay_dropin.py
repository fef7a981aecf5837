"""The relay's drop-in parts that the conformance suite cannot show by
comparing with an engine: the scoped abort's scope, the CORS policy as configured,
and a Responses API stream that breaks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.support.fakes import relay_over
from tests.unit.test_hardening_relay import RelayRig, start_rig


@pytest.fixture
async def slow_rig() -> AsyncIterator[RelayRig]:
    r = await start_rig(itl=0.004, context_length=4096)
    try:
        yield r
    finally:
        await r.close()


async def _stream_with_abort(
    rig: RelayRig, owner: dict[str, str], aborter: dict[str, str]
) -> dict[str, Any]:
    """Start a long /generate stream as `owner`, abort its rid as `aborter` once it
    runs, and return the last event."""
    body = {
        "text": "long",
        "rid": "rid-under-test",
        "stream": True,
        "sampling_params": {"max_new_tokens": 300, "ignore_eos": True},
    }
    last: dict[str, Any] = {}
    async with rig.client.post("/generate", json=body, headers=owner) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")  # it is running
        abort = await rig.client.post(
            "/abort_request", json={"rid": "rid-under-test"}, headers=aborter
        )
        assert abort.status == 200 and await abort.read() == b""
        for event in (await r.read()).split(b"\n\n"):
            if event.startswith(b"data: {"):
                last = json.loads(event[6:])
    return last


async def test_a_client_aborts_its_own_request_by_rid(slow_rig: RelayRig) -> None:
    key = {"Authorization": "Bearer alice"}
    last = await _stream_with_abort(slow_rig, key, key)
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 300


async def test_another_client_cannot_abort_it(slow_rig: RelayRig) -> None:
    last = await _stream_with_abort(
        slow_rig, {"Authorization": "Bearer alice"}, {"Authorization": "Bearer mallory"}
    )
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    assert last["meta_info"]["completion_tokens"] == 300


async def test_abort_all_is_refused(slow_rig: RelayRig) -> None:
    r = await slow_rig.client.post("/abort_request", json={"abort_all": True})
    assert r.status == 403 and "not available through the gateway" in await r.text()


async def _relay_on(
    upstreams: list[web.Application], **settings: Any
) -> tuple[TestClient, list[TestClient]]:
    servers = [TestClient(TestServer(app)) for app in upstreams]
    for s in servers:
        await s.start_server()
    urls = [f"http://127.0.0.1:{s.server.port}" for s in servers]
    relay = relay_over(urls, retry_deadline=2.0, **settings)
    client = TestClient(TestServer(relay.app()))
    await client.start_server()
    return client, servers


def _engine_with_cors() -> web.Application:
    async def models(request: web.Request) -> web.Response:
        headers = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Credentials": "true"}
        return web.json_response({"data": []}, headers=headers)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    return app


async def test_cors_off_drops_the_engines_headers_and_preflights_are_405() -> None:
    client, servers = await _relay_on([_engine_with_cors()], cors_allow_origins="")
    try:
        r = await client.get("/v1/models", headers={"Origin": "https://a.example"})
        assert r.status == 200
        assert not [h for h in r.headers if h.lower().startswith("access-control-")]
        preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
        r = await client.options("/v1/chat/completions", headers=preflight)
        assert r.status == 405
    finally:
        for c in (client, *servers):
            await c.close()


async def test_cors_origin_list_echoes_allowed_origins_only() -> None:
    client, servers = await _relay_on([_engine_with_cors()], cors_allow_origins="https://a.example")
    try:
        r = await client.get("/v1/models", headers={"Origin": "https://a.example"})
        assert r.headers["Access-Control-Allow-Origin"] == "https://a.example"
        assert "Origin" in r.headers["Vary"]
        r = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers
        preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        r = await client.options("/v1/chat/completions", headers=preflight)
        assert r.status == 400 and await r.text() == "Disallowed CORS origin"
    finally:
        for c in (client, *servers):
            await c.close()


def _responses_engine(
    *, fail_first_byte: bool = False, break_after: int | None = None
) -> web.Application:
    """A Responses API stream as serving_responses.py writes it; it can refuse (503)
    or die after `break_after` events."""

    async def responses(request: web.Request) -> web.StreamResponse:
        await request.read()
        if fail_first_byte:
            return web.json_response({"error": "busy"}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        kinds = ["response.created", "response.output_text.delta", "response.completed"]
        for seq, kind in enumerate(kinds):
            if break_after is not None and seq == break_after:
                assert request.transport is not None
                request.transport.close()  # the engine dies mid-stream
                await asyncio.sleep(0)
                return resp
            data = json.dumps({"type": kind, "sequence_number": seq})
            await resp.write(f"event: {kind}\ndata: {data}\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/responses", responses)
    return app


def _events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in body.split(b"\n\n"):
        if event.strip():
            head, data = event.split(b"\n", 1)
            out.append((head.decode()[7:], json.loads(data[6:])))
    return out


async def test_a_responses_stream_refused_before_its_first_byte_is_retried() -> None:
    engines = [_responses_engine(fail_first_byte=True), _responses_engine()]
    client, servers = await _relay_on(engines)
    try:
        r = await client.post("/v1/responses", json={"input": "hi", "stream": "true"})
        assert r.status == 200 and r.headers["X-SGLang-HA-Node"] == "sglang-02"
        kinds = [k for k, _ in _events(await r.read())]
        assert kinds == ["response.created", "response.output_text.delta", "response.completed"]
    finally:
        for c in (client, *servers):
            await c.close()


async def test_a_broken_responses_stream_ends_with_an_error_event() -> None:
    client, servers = await _relay_on([_responses_engine(break_after=2), _responses_engine()])
    try:
        r = await client.post("/v1/responses", json={"input": "hi", "stream": True})
        events = _events(await r.read())
        assert [k for k, _ in events] == ["response.created", "response.output_text.delta", "error"]
        error = events[-1][1]
        assert error["type"] == "error" and error["sequence_number"] == 2
        assert "retry the request" in error["message"]
    finally:
        for c in (client, *servers):
            await c.close()


async def test_no_node_for_generate_answers_in_the_native_shape() -> None:
    client, servers = await _relay_on([web.Application()])
    await servers[0].close()  # nothing listens: every attempt is refused
    try:
        r = await client.post("/generate", json={"text": "x"})
        assert r.status == 503 and r.headers["Content-Type"] == "application/json"
        body = await r.json()
        assert set(body) == {"error"} and "no node could serve" in body["error"]["message"]
    finally:
        for c in (client, *servers):
            await c.close()
