"""Client keys at the gateway (ha_agent/gateway/admission/client_keys.py): what a
client meets with no key, a wrong one, a valid one; rotation without a restart; the
key's name scoping /abort_request, carrying its limits and labelling the metrics;
and Nginx's own check, which keeps its last-resort path to the engines closed too.

The answers copy SGLang 0.5.19's --api-key (python/sglang/srt/utils/auth.py,
`decide_request_auth`); where its source is unpacked (/work/sglang-src) a test
compares the two decisions case by case.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from pydantic import ValidationError

from ha_agent.config import ClientKeyLimit, RelaySettings, SimSettings, is_loopback
from ha_agent.gateway.admission.client_keys import (
    CLIENT_AUTH_HEADER,
    ClientKeys,
    KeyFileError,
    KeyLimits,
    exempt,
    parse_keys,
)
from ha_agent.gateway.edge.nginx_sync import render_client_keys
from ha_agent.gateway.stream.relay import Relay
from ha_agent.gateway.upstream.transport import forward_headers
from ha_agent.sim.server import create_app
from tests.support.fakes import FakeClock, relay_over
from tests.support.nginx_render import render_into
from tests.support.processes import free_port, stop_process
from tests.unit.conftest import SIM_AUTH, SIM_FAST
from tests.unit.test_hardening_nginx import NGINX, needs_nginx, require_nginx, start_nginx

__all__ = ["require_nginx"]  # the fixture `needs_nginx` names

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
ENGINE = "engine-api-key-for-the-sims"
LONG = {"max_new_tokens": 400, "ignore_eos": True}
UNAUTHORIZED = {"error": "Unauthorized"}


def write_keys(path: Path, **keys: str) -> None:
    """Rewritten in place, as `make secrets` does (a bind mount keeps seeing it)."""
    text = "# test keys\n" + "".join(f"{name}:{key}\n" for name, key in keys.items())
    with open(path, "w") as fh:
        fh.write(text)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def last_event(resp: Any) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for event in (await resp.read()).split(b"\n\n"):
        if event.startswith(b"data: {"):
            last = json.loads(event[6:])
    return last


@contextlib.asynccontextmanager
async def gateway_relay(
    tmp_path: Path, sims: int = 1, **settings: Any
) -> AsyncIterator[tuple[TestClient, Relay, Path]]:
    """A relay with client keys on (alice, bob) in front of `sims` simulators that
    enforce the engine key, as in the stacks."""
    keys = tmp_path / "client_keys"
    write_keys(keys, alice=ALICE, bob=BOB)
    engines = []
    for _ in range(sims):
        sim = TestClient(
            TestServer(create_app(SimSettings(**{**SIM_FAST, "itl": 0.005, "api_key": ENGINE})))
        )
        await sim.start_server()
        engines.append(sim)
    relay = relay_over(
        [f"http://127.0.0.1:{s.server.port}" for s in engines],
        engine_api_key=ENGINE,
        client_auth="on",
        client_keys_file=keys,
        client_keys_poll=0.01,
        **settings,
    )
    client = TestClient(TestServer(relay.app()))
    await client.start_server()
    try:
        yield client, relay, keys
    finally:
        await client.close()
        await relay.transport.close()
        for sim in engines:
            await sim.close()


# -- SGLang's rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "valid"),
    [
        (None, False),
        ("", False),
        (f"Bearer {ALICE}", True),
        (f"bearer {ALICE}", True),
        (f"BEARER {ALICE}", True),
        (f"Bearer  {ALICE}", False),  # SGLang splits once: the key would start with a space
        (f"Bearer {ALICE} ", False),  # nor is it trimmed
        (f"Basic {ALICE}", False),
        (ALICE, False),
        (f"Bearer {ALICE[:-1]}", False),
        ("Bearer \udcff", False),  # bytes that are not UTF-8: wrong, not a 500
    ],
)
def test_the_header_is_read_as_sglang_reads_it(
    tmp_path: Path, header: str | None, valid: bool
) -> None:
    path = tmp_path / "keys"
    write_keys(path, alice=ALICE)
    assert (ClientKeys(path).identify(header) == "alice") is valid


def test_exempt_paths_are_sglangs() -> None:
    for method, path in [("GET", "/health"), ("GET", "/health_generate"), ("GET", "/metrics")]:
        assert exempt(method, path)
    assert exempt("OPTIONS", "/v1/chat/completions")
    for path in ("/v1/models", "/model_info", "/generate", "/abort_request"):
        assert not exempt("GET", path)


SGLANG_AUTH = Path("/work/sglang-src/v19/sglang/srt/utils/auth.py")


@pytest.mark.skipif(not SGLANG_AUTH.exists(), reason="SGLang's source is not unpacked here")
def test_same_decisions_as_sglangs_decide_request_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("sglang_auth", SGLANG_AUTH)
    assert spec is not None and spec.loader is not None
    sglang = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sglang_auth", sglang)  # its dataclasses look it up
    spec.loader.exec_module(sglang)
    path = tmp_path / "keys"
    write_keys(path, alice=ALICE)
    keys = ClientKeys(path)
    headers = [None, "", f"Bearer {ALICE}", f"bEaReR {ALICE}", f"Bearer  {ALICE}", "Bearer x"]
    headers += [f"Token {ALICE}", f"Bearer {ALICE}x", f"Bearer\t{ALICE}"]
    for method in ("GET", "POST", "OPTIONS"):
        for p in ("/health", "/health_generate", "/metrics", "/generate", "/v1/models"):
            for header in headers:
                theirs = sglang.decide_request_auth(
                    method=method,
                    path=p,
                    authorization_header=header,
                    api_key=ALICE,
                    admin_api_key=None,
                    auth_level=sglang.AuthLevel.NORMAL,
                ).allowed
                ours = exempt(method, p) or keys.identify(header) is not None
                assert ours == theirs, (method, p, header)


# -- the key file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "alice\n",
        f"al ice:{ALICE}\n",
        "alice:short\n",
        f"alice:{ALICE}\nalice:{BOB}\n",
        f"alice:{ALICE}\nbob:{ALICE}\n",
        f"anonymous:{ALICE}\n",
        'alice:has"quote-0123456789\n',
    ],
)
def test_a_bad_key_file_is_refused_without_showing_a_key(text: str) -> None:
    with pytest.raises(KeyFileError) as err:
        parse_keys(text)
    assert ALICE not in str(err.value) and BOB not in str(err.value)


def test_loopback_or_not() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.5")


def test_keys_are_on_beyond_loopback_and_the_relay_refuses_to_start_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HA_CLIENT_AUTH", "HA_GATEWAY_BIND", "GATEWAY_BIND", "HA_CLIENT_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "client_keys"
    assert not RelaySettings(client_keys_file=missing).client_auth_on  # the loopback demo
    with pytest.raises(ValidationError, match="make secrets"):
        RelaySettings(gateway_bind="0.0.0.0", client_keys_file=missing)
    monkeypatch.setenv("HA_GATEWAY_BIND", "192.168.1.20")
    with pytest.raises(ValidationError, match="HA_CLIENT_AUTH=off"):
        RelaySettings(client_keys_file=missing)
    assert not RelaySettings(client_auth="off", client_keys_file=missing).client_auth_on
    write_keys(missing, alice=ALICE)
    settings = RelaySettings(client_keys_file=missing)
    assert settings.client_auth_on
    assert ALICE not in settings.model_dump_json()


def test_a_broken_rewrite_keeps_the_keys_read_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    write_keys(path, alice=ALICE)
    clock = FakeClock()
    keys = ClientKeys(path, poll=1.0, clock=clock)
    path.write_text(f"alice:{BOB}\nnot a line\n")
    clock.advance(1.0)
    with caplog.at_level(logging.ERROR):
        assert keys.identify(f"Bearer {ALICE}") == "alice"
    assert "line 2" in caplog.text and BOB not in caplog.text and ALICE not in caplog.text


# -- through the relay ------------------------------------------------------------------


async def test_no_key_or_a_wrong_one_is_sglangs_401_and_reaches_no_engine(
    tmp_path: Path, sim_env_clean: None
) -> None:
    async with gateway_relay(tmp_path) as (client, _, _):
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
        for headers in ({}, auth("wrong-key-0123456789abc"), {"Authorization": ALICE}):
            r = await client.post("/generate", json=body, headers=headers)
            assert r.status == 401
            assert await r.json() == UNAUTHORIZED
            assert "WWW-Authenticate" not in r.headers  # SGLang sends none
        # /health needs no key, as on SGLang; /v1/models does.
        assert (await client.get("/health")).status == 200
        assert (await client.get("/v1/models")).status == 401
        assert (await client.get("/v1/models", headers=auth(BOB))).status == 200
        # The engine key is not a client key: it only opens the engines.
        assert (await client.post("/generate", json=body, headers=auth(ENGINE))).status == 401
        r = await client.post("/generate", json=body, headers=auth(ALICE))
        assert r.status == 200 and (await r.json())["text"]


async def test_the_key_nginx_passes_on_is_checked_and_never_sent_upstream(
    tmp_path: Path, sim_env_clean: None
) -> None:
    """Behind Nginx, Authorization holds the engines' key and the client's travels in
    CLIENT_AUTH_HEADER; nothing of the client's key goes on to an engine."""
    async with gateway_relay(tmp_path) as (client, _, _):
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 4}}
        behind_nginx = {**auth(ENGINE), CLIENT_AUTH_HEADER: f"Bearer {ALICE}"}
        assert (await client.post("/generate", json=body, headers=behind_nginx)).status == 200
        wrong = {**auth(ENGINE), CLIENT_AUTH_HEADER: "Bearer nope-0123456789abcdef"}
        assert (await client.post("/generate", json=body, headers=wrong)).status == 401
    assert CLIENT_AUTH_HEADER.lower() not in {k.lower() for k in forward_headers(behind_nginx)}


async def test_a_stream_admitted_before_a_rotation_finishes_and_new_requests_need_the_new_key(
    tmp_path: Path, sim_env_clean: None
) -> None:
    new_alice = "alice-rotated-0123456789abcdef"
    async with gateway_relay(tmp_path) as (client, _, keys):
        body = {"text": "long", "stream": True, "sampling_params": {**LONG, "max_new_tokens": 80}}
        async with client.post("/generate", json=body, headers=auth(ALICE)) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")  # running
            write_keys(keys, alice=new_alice, bob=BOB)
            deadline = time.monotonic() + 5
            while (await client.get("/v1/models", headers=auth(ALICE))).status != 401:
                assert time.monotonic() < deadline, "the old key still works"
                await asyncio.sleep(0.02)
            last = await last_event(stream)
            ended = (await stream.read()).endswith(b"data: [DONE]\n\n")
        assert last["meta_info"]["finish_reason"]["type"] == "length", "the stream finished"
        assert last["meta_info"]["completion_tokens"] == 80 and ended
        assert (await client.get("/v1/models", headers=auth(new_alice))).status == 200
        assert (await client.get("/v1/models", headers=auth(BOB))).status == 200


async def test_a_keyed_stream_migrates_as_before(tmp_path: Path, sim_env_clean: None) -> None:
    """The primary's engine ends the stream on its own fault after 20 tokens: the
    stream moves to the standby and ends whole, with the client's key checked once."""
    async with gateway_relay(tmp_path, sims=2) as (client, relay, _):
        primary = relay.topology.nodes[relay.topology.primary or ""].engine_url
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(
                primary + "/sim/faults",
                json={"abort_after_tokens": 20, "abort_cause": "retract_host_pool"},
                headers=SIM_AUTH,
            )
            assert r.status_code == 200, r.text
        body = {
            "input_ids": [5, 6, 7],
            "stream": True,
            "sampling_params": {**LONG, "max_new_tokens": 60},
        }
        async with client.post("/generate", json=body, headers=auth(ALICE)) as stream:
            assert stream.status == 200
            last = await last_event(stream)
        assert last["meta_info"]["finish_reason"]["type"] == "length"
        assert len(last["output_ids"]) == 60
        assert relay.metrics.migrations.labels("generate", "migrated")._value.get() == 1


async def test_one_client_cannot_abort_anothers_request_from_the_same_address(
    tmp_path: Path, sim_env_clean: None
) -> None:
    """Two keys behind one address (a NAT): each aborts only its own requests."""
    async with gateway_relay(tmp_path, sims=2) as (client, _, _):
        body = {"text": "long", "rid": "job-1", "stream": True, "sampling_params": LONG}
        async with client.post("/generate", json=body, headers=auth(ALICE)) as stream:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
            r = await client.post("/abort_request", json={"rid": "job-1"}, headers=auth(BOB))
            assert r.status == 200  # as SGLang for a rid it does not know: nothing done
            await asyncio.sleep(0.1)  # what an abort would have done by now, it would show
            r = await client.post("/abort_request", json={"rid": "job-1"}, headers=auth(ALICE))
            assert r.status == 200
            last = await last_event(stream)
        reason = last["meta_info"]["finish_reason"]
        assert reason["type"] == "abort"
        # Aborted by alice's own call, not bob's: most of the budget was still to come.
        assert last["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
        # Without a key, no abort at all.
        assert (await client.post("/abort_request", json={"rid": "job-1"})).status == 401


async def test_bobs_abort_leaves_alices_stream_running_to_its_end(
    tmp_path: Path, sim_env_clean: None
) -> None:
    async with gateway_relay(tmp_path) as (client, _, _):
        body = {"text": "x", "rid": "job-2", "stream": True, "sampling_params": LONG}
        body["sampling_params"] = {**LONG, "max_new_tokens": 60}
        async with client.post("/generate", json=body, headers=auth(ALICE)) as stream:
            await stream.content.readuntil(b"\n\n")
            r = await client.post("/abort_request", json={"rid": "job-2"}, headers=auth(BOB))
            assert r.status == 200
            last = await last_event(stream)
        assert last["meta_info"]["finish_reason"]["type"] == "length"


async def test_a_keys_concurrency_limit_is_a_429_for_it_alone(
    tmp_path: Path, sim_env_clean: None
) -> None:
    limits = {"alice": ClientKeyLimit(concurrency=1)}
    async with gateway_relay(tmp_path, client_key_limits=limits) as (client, relay, _):
        body = {"text": "long", "stream": True, "sampling_params": {**LONG, "max_new_tokens": 60}}
        async with client.post("/generate", json=body, headers=auth(ALICE)) as stream:
            await stream.content.readuntil(b"\n\n")
            r = await client.post("/v1/completions", json={"prompt": "x"}, headers=auth(ALICE))
            assert r.status == 429 and r.headers["Retry-After"] == "1"
            assert "alice" in (await r.json())["message"]
            # Another key is not held back by alice's limit.
            quick = {"prompt": "x", "max_tokens": 2}
            assert (
                await client.post("/v1/completions", json=quick, headers=auth(BOB))
            ).status == 200
            await stream.read()
        r = await client.post("/v1/completions", json=quick, headers=auth(ALICE))
        assert r.status == 200, "the slot is given back when the stream ends"
        assert relay.clients.limits.inflight == {}


async def test_a_keys_rate_limit_is_a_429_with_retry_after(
    tmp_path: Path, sim_env_clean: None
) -> None:
    async with gateway_relay(tmp_path, client_key_rate=0.5, client_key_burst=2) as (
        client,
        _,
        _,
    ):
        codes = [(await client.get("/v1/models", headers=auth(ALICE))).status for _ in range(3)]
        assert codes == [200, 200, 429]
        r = await client.get("/v1/models", headers=auth(ALICE))
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert (await client.get("/v1/models", headers=auth(BOB))).status == 200


def test_a_token_bucket_refills_at_the_keys_rate_split_over_workers() -> None:
    clock = FakeClock()
    limits = KeyLimits(lambda _: ClientKeyLimit(rate=4, burst=4, concurrency=4), 2, clock)
    assert [limits.acquire("a") is None for _ in range(3)] == [True, True, False]
    refused = limits.acquire("a")
    assert refused is not None and refused.retry_after == 1
    for _ in range(2):
        limits.release("a")
    clock.advance(0.5)  # 2 r/s for this worker: one more
    assert limits.acquire("a") is None and limits.acquire("a") is not None
    assert limits.acquire("b") is None  # its own bucket


async def test_metrics_are_labelled_by_key_name_never_by_key(
    tmp_path: Path, sim_env_clean: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        async with gateway_relay(tmp_path) as (client, relay, keys):
            await client.get("/v1/models", headers=auth(ALICE))
            await client.get("/v1/models", headers=auth(ALICE))
            await client.get("/v1/models", headers=auth("wrong-0123456789abcdef"))
            write_keys(keys, alice=ALICE, bob=BOB, carol="carol-key-0123456789abcdef")
            await asyncio.sleep(0.05)
            await client.get("/v1/models", headers=auth(BOB))
    registry = relay.metrics.registry

    def count(client_label: str, code: str) -> float | None:
        return registry.get_sample_value(
            "sglang_ha_relay_client_requests_total", {"client": client_label, "code": code}
        )

    assert count("alice", "200") == 2
    assert count("anonymous", "401") == 1
    assert count("bob", "200") == 1
    exposition = generate_latest(registry).decode()
    for key in (ALICE, BOB, "wrong-0123456789abcdef", "carol-key"):
        assert key not in exposition and key not in caplog.text
    assert "carol" in caplog.text  # the re-read is logged, by name


# -- Nginx: its own check, so that its last-resort path is no way around the keys -----------


def test_the_nginx_map_matches_as_sglang_reads_the_header() -> None:
    text = render_client_keys({"alice": "a.b+c-0123456789abcdef"})
    assert '"~^(?i:bearer) a\\.b\\+c-0123456789abcdef$" "alice";' in text
    assert 'default "";' in text
    assert 'default "-";' in render_client_keys(None)


@contextlib.asynccontextmanager
async def nginx_over_engine(
    keys: dict[str, str] | None,
) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Nginx with its relay down (nothing listens there) and one engine as its last
    resort, recording the headers that reached it."""
    seen: list[dict[str, str]] = []

    async def engine(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", engine)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    engine_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", engine_port).start()
    env = {"ENGINE_AUTHORIZATION": f"Bearer {ENGINE}"}
    backup = f"server 127.0.0.1:{engine_port} backup;\n"
    workdir, port, proc = start_nginx(free_port(), env, client_keys=keys, backup=backup)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            assert time.monotonic() < deadline, "nginx did not start"
            await asyncio.sleep(0.05)
        yield url, seen
    finally:
        stop_process(proc, timeout=10)
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@needs_nginx
async def test_with_the_relay_down_nginx_still_requires_a_key() -> None:
    assert NGINX is not None
    async with (
        nginx_over_engine({"alice": ALICE}) as (url, seen),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        for headers in ({}, auth("wrong-0123456789abcdef"), auth(ENGINE)):
            r = await http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json() == UNAUTHORIZED
            r = await http.post("/generate", json={"text": "x"}, headers=headers)
            assert r.status_code == 401
        assert seen == [], "no request without a valid key reached an engine"
        # As SGLang: /health needs no key.
        assert (await http.get("/health")).status_code == 200
        for header in (f"Bearer {ALICE}", f"bearer {ALICE}"):
            r = await http.get("/v1/models", headers={"Authorization": header})
            assert r.status_code == 200
        assert (await http.get("/v1/models", headers=auth(ALICE + "x"))).status_code == 401
    # What reached the engine: its own key, never a client's in Authorization.
    assert all(h["Authorization"] == f"Bearer {ENGINE}" for h in seen)


@needs_nginx
async def test_with_keys_off_nginx_lets_everyone_through() -> None:
    async with (
        nginx_over_engine(None) as (url, seen),
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.get("/v1/models", headers=auth("anything"))).status_code == 200
    assert len(seen) == 2


def test_the_gateway_entrypoint_writes_nginxs_keys_or_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ha_agent.gateway.edge import nginx_conf

    render_into(
        monkeypatch,
        tmp_path,
        HA_GATEWAY_BIND="0.0.0.0",
        HA_CLIENT_KEYS_FILE=str(tmp_path / "client_keys"),
    )
    monkeypatch.delenv("HA_CLIENT_AUTH", raising=False)
    assert nginx_conf.main() == 2
    assert "run 'make secrets'" in capsys.readouterr().err
    write_keys(tmp_path / "client_keys", alice=ALICE)
    assert nginx_conf.main() == 0
    rendered = tmp_path / "client-keys.conf"
    assert '"alice";' in rendered.read_text() and 'default "";' in rendered.read_text()
    assert rendered.stat().st_mode & 0o077 == 0  # it holds the keys
