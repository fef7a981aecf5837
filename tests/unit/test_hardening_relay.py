"""The relay's front door in-process: bad input is answered by the relay and never
reaches an engine; good input still does; nothing of it touches the relay's view.

The engines are in-process simulators; the relay's topology is set by hand (both
nodes healthy, sglang-01 primary), so a request that got through shows up in the
primary simulator's counters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ha_agent.config import SimSettings
from ha_agent.gateway.stream.relay import Relay
from ha_agent.openapi import inference
from ha_agent.sim import create_app
from ha_agent.sim.protocol import BadRequest, RequestBuilder
from ha_agent.sim.tokenizer import SimTokenizer
from tests.support.fakes import relay_over
from tests.support.raw_http import framed, raw_http
from tests.unit.conftest import SIM_FAST, sim_metric


@dataclass
class RelayRig:
    client: TestClient
    relay: Relay
    sims: dict[str, TestClient]

    async def engine_requests(self) -> float:
        total = 0.0
        for sim in self.sims.values():
            total += await sim_metric(sim, "sglang:num_requests_total")
        return total

    def view(self) -> list[tuple[str, bool, bool, str]]:
        t = self.relay.topology
        now = t.clock()
        return [(n.name, n.failed, n.can_serve(now), n.engine_state) for n in t.nodes.values()]

    async def close(self) -> None:
        await self.relay.transport.close()
        for c in (self.client, *self.sims.values()):
            await c.close()


async def start_rig(**sim: Any) -> RelayRig:
    sims: dict[str, TestClient] = {}
    for name in ("sglang-01", "sglang-02"):
        settings = SimSettings(**{**SIM_FAST, "context_length": 512, **sim})
        c = TestClient(TestServer(create_app(settings)))
        await c.start_server()
        sims[name] = c
    relay = relay_over([f"http://127.0.0.1:{c.server.port}" for c in sims.values()])
    client = TestClient(TestServer(relay.app()))
    await client.start_server()
    return RelayRig(client, relay, sims)


@pytest.fixture
async def rig(sim_env_clean: None) -> AsyncIterator[RelayRig]:
    r = await start_rig()
    try:
        yield r
    finally:
        await r.close()


async def raw_request(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, _, rest = await raw_http(port, framed(head, body))
    return status, rest


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# -- paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/pause_generation"),
        ("POST", "/flush_cache"),
        ("GET", "/flush_cache"),
        ("GET", "/get_server_info"),
        ("GET", "/server_info"),
        ("GET", "/metrics"),
        ("POST", "/sim/faults"),
        ("DELETE", "/sim/faults"),
        ("POST", "/update_weights_from_disk"),
        ("GET", "/"),
        ("GET", "/v1/models/../../get_server_info"),
        ("GET", "/v1/models/%2e%2e/%2e%2e/get_server_info"),
        ("POST", "/generate/../pause_generation"),
        ("POST", "/v1/chat/completions/"),
        ("POST", "//v1/chat/completions"),
        ("POST", "/v1/chat%2Fcompletions"),
    ],
)
async def test_engine_admin_and_unknown_paths_are_404_and_never_forwarded(
    rig: RelayRig, method: str, path: str
) -> None:
    before = rig.view()
    # Over a raw socket: the path exactly as a client could send it (aiohttp's and
    # yarl's clients would normalise the dot segments away).
    assert rig.client.server.port is not None
    status, body = await raw_request(rig.client.server.port, method, path, b'{"abort_all": true}')
    assert status == 404, (path, body)
    assert json.loads(body) == {"detail": "Not Found"}  # what SGLang (Starlette) answers
    info = await (await rig.sims["sglang-01"].get("/get_server_info")).json()
    assert info["paused"] is False
    assert rig.view() == before


async def test_wrong_method_is_405_with_allow(rig: RelayRig) -> None:
    r = await rig.client.get("/v1/chat/completions")
    assert r.status == 405 and r.headers["Allow"] == "POST"
    r = await rig.client.post("/v1/models", json={})
    assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"
    assert await rig.engine_requests() == 0


async def test_public_reads_pass(rig: RelayRig) -> None:
    for path in ("/v1/models", "/health", "/model_info", "/get_model_info"):
        r = await rig.client.get(path)
        assert r.status == 200, path
        assert r.headers["X-SGLang-HA-Node"] == "sglang-01"
    r = await rig.client.get("/v1/models/sglang-ha-simulator")
    assert r.status == 200
    r = await rig.client.get("/v1/models/Qwen/Qwen2.5-7B-Instruct")
    assert r.status == 404 and r.headers["X-SGLang-HA-Node"] == "sglang-01"  # the engine's 404


# -- bodies ----------------------------------------------------------------------------


def _chat(**extra: Any) -> dict[str, Any]:
    return {**CHAT, **extra}


# What the relay refuses itself: hard limits SGLang lacks, and SamplingParams.verify's
# ranges in SGLang's words.
BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("/v1/chat/completions", b"{broken", "not valid JSON"),
    ("/v1/chat/completions", b"", "not valid JSON"),
    ("/v1/chat/completions", b"[1]", "must be a JSON object"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "temperature": NaN}', "NaN"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "top_p": Infinity}', "finite"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "temperature": 1e999}', "finite"),
    ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ("/v1/chat/completions", b"\xff\xfe\xfd", "not valid JSON"),
    ("/v1/chat/completions", json.dumps(_chat(temperature="nan")).encode(), "finite"),
    ("/v1/chat/completions", json.dumps(_chat(temperature=-0.5)).encode(), "temperature"),
    ("/v1/chat/completions", json.dumps(_chat(temperature="-0.5")).encode(), "temperature"),
    ("/v1/chat/completions", json.dumps(_chat(top_p=0)).encode(), "top_p"),
    ("/v1/chat/completions", json.dumps(_chat(top_p=1.5)).encode(), "top_p"),
    ("/v1/chat/completions", json.dumps(_chat(top_k=0)).encode(), "top_k"),
    ("/v1/chat/completions", json.dumps(_chat(min_p=2)).encode(), "min_p"),
    ("/v1/chat/completions", json.dumps(_chat(frequency_penalty=3)).encode(), "frequency"),
    ("/v1/chat/completions", json.dumps(_chat(presence_penalty=-3)).encode(), "presence"),
    ("/v1/chat/completions", json.dumps(_chat(repetition_penalty=0)).encode(), "repetition"),
    ("/v1/chat/completions", json.dumps(_chat(max_tokens=-1)).encode(), "max_new_tokens"),
    ("/v1/chat/completions", json.dumps(_chat(n=10**9)).encode(), "n must be"),
    ("/v1/chat/completions", json.dumps(_chat(n=0)).encode(), "n must be"),
    ("/v1/chat/completions", json.dumps(_chat(messages=[])).encode(), "empty"),
    ("/v1/chat/completions", json.dumps(_chat(top_logprobs=1000)).encode(), "top_logprobs"),
    ("/v1/completions", json.dumps({"prompt": [1, -2]}).encode(), "token ids"),
    ("/generate", json.dumps({"sampling_params": {}}).encode(), "should be provided"),
    ("/generate", json.dumps({"input_ids": [5, -1]}).encode(), "token ids"),
    ("/generate", json.dumps({"input_ids": []}).encode(), "cannot be empty"),
    (
        "/generate",
        json.dumps({"text": "x", "sampling_params": {"temperature": "0.5"}}).encode(),
        "must be a number",
    ),
    (
        "/generate",
        json.dumps({"text": "x", "sampling_params": {"temperature": -1}}).encode(),
        "temperature",
    ),
    (
        "/generate",
        json.dumps(
            {"text": "x", "sampling_params": {"min_new_tokens": 9, "max_new_tokens": 2}}
        ).encode(),
        "min_new_tokens",
    ),
    (
        "/generate",
        json.dumps({"text": "x", "sampling_params": {"stop_token_ids": [-4]}}).encode(),
        "stop_token_ids",
    ),
]


def _message(path: str, answer: dict[str, Any]) -> str:
    """SGLang's shapes: /generate's own 400s are {"error": {"message"}}; bad JSON and
    types are FastAPI validation errors, OpenAI-shaped on every route."""
    if path == "/generate" and "error" in answer:
        assert set(answer) == {"error"} and set(answer["error"]) == {"message"}
        return str(answer["error"]["message"])
    assert answer["object"] == "error" and answer["code"] == 400 and answer["param"] is None
    return str(answer["message"])


@pytest.mark.parametrize(("path", "body", "words"), BAD_BODIES)
async def test_bad_bodies_are_answered_400_by_the_relay(
    rig: RelayRig, path: str, body: bytes, words: str
) -> None:
    before = rig.view()
    r = await rig.client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400, await r.text()
    assert r.headers["Content-Type"] == "application/json"  # SGLang's, no charset
    assert words in _message(path, await r.json())
    assert await rig.engine_requests() == 0, "bad input must never reach an engine"
    assert rig.view() == before


# What SGLang's pydantic models read leniently, the relay reads the same way.
LAX_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", _chat(temperature="0.5", max_tokens="3", stream="false")),
    ("/v1/chat/completions", _chat(max_tokens=True, top_k=2.0, seed="7")),
    ("/v1/completions", {"prompt": "x", "max_tokens": "2", "echo": "no", "n": "1"}),
    ("/generate", {"text": "x", "input_ids": [1], "sampling_params": {"max_new_tokens": 2}}),
    ("/generate", {"text": "x", "stream": "0", "sampling_params": {"max_new_tokens": 2}}),
]


@pytest.mark.parametrize(("path", "body"), LAX_BODIES)
async def test_values_sglang_coerces_are_served(
    rig: RelayRig, path: str, body: dict[str, Any]
) -> None:
    r = await rig.client.post(path, json=body)
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == "application/json"  # not a stream: "false" read


# Type errors that do not hurt an engine: its own 400, in its own words.
ENGINE_REFUSES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", _chat(top_k=2.5)),
    ("/v1/chat/completions", _chat(messages="hi")),
    ("/v1/chat/completions", _chat(model=7)),
    # No range in SGLang: passed on (the simulator then refuses logit_bias as unsupported).
    ("/v1/chat/completions", _chat(logit_bias={"1": 500})),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"max_tokens": 3}),
    ("/generate", {"text": 5}),
    ("/generate", {"text": "x", "sampling_params": 3}),
]


@pytest.mark.parametrize(("path", "body"), ENGINE_REFUSES)
async def test_type_errors_get_the_engines_own_400(
    rig: RelayRig, path: str, body: dict[str, Any]
) -> None:
    before = rig.view()
    r = await rig.client.post(path, json=body)
    assert r.status == 400, await r.text()
    assert r.headers["X-SGLang-HA-Node"] == "sglang-01"
    assert rig.view() == before, "the client's 400 never counts against the node"


async def test_oversized_body_is_413_without_reaching_an_engine(rig: RelayRig) -> None:
    # The relay's own cap (64 MiB) is far above Nginx's; a small app shows the path.
    app = rig.relay.app()
    app._client_max_size = 1024  # type: ignore[attr-defined]
    async with TestClient(TestServer(app)) as small:
        r = await small.post("/v1/chat/completions", data=b"x" * 4096)
        assert r.status == 413
        assert (await r.json())["code"] == 413
    assert await rig.engine_requests() == 0


async def test_valid_edge_values_still_pass(rig: RelayRig) -> None:
    good = [
        ("/v1/chat/completions", _chat(temperature=0, top_p=1, top_k=-1, min_p=0)),
        ("/v1/chat/completions", _chat(max_tokens=4.0, frequency_penalty=-2, presence_penalty=2)),
        ("/v1/chat/completions", _chat(repetition_penalty=2, n=1, seed=3, stream=False)),
        ("/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}),
        ("/generate", {"input_ids": [[1, 2]], "sampling_params": {"max_new_tokens": 0}}),
        ("/generate", {"text": "x", "sampling_params": None, "stream": True}),
    ]
    served = 0
    for path, body in good:
        r = await rig.client.post(path, json=body)
        text = await r.text()
        served += r.status == 200
        # Served, or (penalties) refused by the simulator itself, never by the relay.
        assert r.status == 200 or "not supported by the simulator" in text, (body, text)
        assert r.headers["X-SGLang-HA-Node"] == "sglang-01"
    assert await rig.engine_requests() == served


async def test_a_flood_of_bad_requests_changes_nothing(rig: RelayRig) -> None:
    before = rig.view()
    for i in range(300):
        path, body, _ = BAD_BODIES[i % len(BAD_BODIES)]
        r = await rig.client.post(path, data=body)
        assert r.status == 400
        r = await rig.client.get(f"/no/such/{i}")
        assert r.status == 404
    assert await rig.engine_requests() == 0
    assert rig.view() == before
    assert rig.relay.topology.primary == "sglang-01" and rig.relay.topology.epoch == 1
    retries = rig.relay.metrics.registry.get_sample_value("sglang_ha_relay_retries_total")
    assert not retries
    r = await rig.client.post("/v1/chat/completions", json=CHAT)
    assert r.status == 200


# -- the relay never refuses what the engine would take ---------------------------------------

_numbers = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.floats(-3.0, 3.0, allow_nan=False),
    st.sampled_from([0, 1, -1, 0.0, 1.0, 2.0, -2.0, 1e-9, 128, 129, 1e300]),
    st.sampled_from(["1", "nan", True, [1], {}]),
)
_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "n",
)


_BUILDER: list[RequestBuilder] = []


def _builder() -> RequestBuilder:
    if not _BUILDER:  # the tokenizer takes a while to build: once per session
        _BUILDER.append(RequestBuilder(SimSettings(context_length=512), SimTokenizer()))
    return _BUILDER[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["chat", "completions", "generate"]),
    params=st.dictionaries(st.sampled_from(_PARAMS), _numbers, max_size=4),
    max_tokens=st.one_of(st.none(), st.integers(-3, 600), st.sampled_from([True, 2.5, "8"])),
    min_tokens=st.one_of(st.none(), st.integers(-2, 40)),
)
def test_relay_refuses_only_what_the_engine_refuses(
    kind: str, params: dict[str, Any], max_tokens: Any, min_tokens: Any
) -> None:
    """Against the simulator's request parser (SGLang's checks): whatever the relay
    refuses for its value, the engine would have refused too (no false 400s). Where
    they differ on purpose: /generate's sampling_params must hold JSON numbers, and
    non-finite numbers never get through."""
    if kind == "generate":
        sp = {**params, "max_new_tokens": max_tokens, "min_new_tokens": min_tokens}
        body: dict[str, Any] = {"text": "hello", "sampling_params": sp}
    else:
        body = {**params, "max_tokens": max_tokens, "min_tokens": min_tokens}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "hello"}]
        else:
            body["prompt"] = "hello"
    try:
        inference.check_body(kind, json.loads(json.dumps(body)))
        relay_refused = None
    except inference.BadInput as exc:
        relay_refused = exc.message
    build = {"chat": _builder().chat, "completions": _builder().completion}
    try:
        build.get(kind, _builder().generate)(json.loads(json.dumps(body)))
        engine_refused = None
    except BadRequest as exc:
        engine_refused = exc.message
    if relay_refused is not None and engine_refused is None:
        # /generate's sampling_params are not coerced by SGLang (a 500 there), and
        # non-finite numbers never get through.
        strict = "must be a number" in relay_refused or "finite" in relay_refused
        assert strict, (body, relay_refused)


_STREAMED = {**CHAT, "stream": True, "temperature": 0.5}


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(_STREAMED).encode(),
        b"\xef\xbb\xbf" + json.dumps(_STREAMED).encode(),  # a UTF-8 byte order mark
        json.dumps(_STREAMED, ensure_ascii=False).encode("utf-16"),
        json.dumps({"prompt": "caf\u00e9 \u2603", "max_tokens": 1.0}).encode("utf-32-le"),
    ],
)
def test_bodies_are_read_as_json_loads_reads_them(raw: bytes) -> None:
    """The relay's parse (one decoder built once) reads every encoding JSON's own
    loads does, to the same value: a body an engine would take is never a 400."""
    assert inference.parse_json(raw) == json.loads(raw)


def test_public_routes_cover_the_generation_endpoints() -> None:
    from ha_agent.openapi.endpoints import ROUTES, Semantics

    migrating = [e.path for e in ROUTES if e.semantics is Semantics.MIGRATE]
    assert {"/generate", "/v1/completions", "/v1/chat/completions"} <= set(migrating)
    for path in migrating:
        assert "POST" in inference.PUBLIC_ROUTES[path]


async def test_a_garbage_request_line_gets_a_400_not_a_hang(rig: RelayRig) -> None:
    """A request line aiohttp itself refuses still gets an answer, not a hang."""
    port = rig.client.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GARBAGE\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.read(100), timeout=5)
    writer.close()
    assert head.split(b" ")[1] == b"400", head
