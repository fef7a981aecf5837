"""Admission at the relay (gateway/admission/limits.py, shedding.py, quarantine.py, admission.py):
what a client sees for a too-heavy request, a saturated primary and a query of death."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from ha_agent.config import RelaySettings
from ha_agent.dcs.base import AgentStatus, EngineState, EngineStatus, Role
from ha_agent.events import EventLog
from ha_agent.gateway.admission.gate import Admission, RelayParts
from ha_agent.gateway.admission.limits import Limits, LimitSettings, constraints, prompt_size
from ha_agent.gateway.admission.quarantine import Quarantine, fingerprint, node_died
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.upstream.topology import NodeView, Topology
from ha_agent.gateway.upstream.transport import FailureCause, Transport, UpstreamFailure, classify
from ha_agent.openapi.endpoints import CHAT, COMPLETIONS, GENERATE
from tests.support.fakes import FakeClock, FakeStore

NESTED = "(?:a{1000}){1000}"
MB = 1024 * 1024


def status(state: EngineState = EngineState.HEALTHY, queued: float = 0) -> AgentStatus:
    return AgentStatus(
        node="n", role=Role.PRIMARY, epoch=1, engine=EngineStatus(state=state, queued=queued)
    )


@pytest.fixture
def admission(tmp_path: Any) -> Admission:
    settings = RelaySettings(
        nodes=["a=http://a:1=http://a:2", "b=http://b:1=http://b:2"],
        context_length=32768,
        shed_queue_bound=16,
        ha_log=str(tmp_path / "ha.log"),
    )
    events = EventLog(str(tmp_path / "ha.log"), "relay")
    topology = Topology(settings, FakeStore(FakeClock()), events)
    topology.primary = "a"
    for node in topology.nodes.values():
        node.status = status()
    adm = Admission(RelayParts(settings, topology, Transport(0.5, 60), RelayMetrics(), events))
    adm.confirm_s = 0.5
    return adm


def request(path: str) -> web.Request:
    return make_mocked_request("POST", path)


def body_of(resp: web.Response) -> Any:
    assert isinstance(resp.body, bytes)
    return json.loads(resp.body)


# -- limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [4 * 1024 * 1024, 15 * 1024 * 1024])
async def test_a_prompt_longer_than_the_context_is_refused_fast_in_each_shape(
    admission: Admission, size: int
) -> None:
    text = "x" * size
    for path, kind, payload in (
        ("/generate", GENERATE, {"text": text}),
        ("/v1/completions", COMPLETIONS, {"model": "m", "prompt": text}),
        (
            "/v1/chat/completions",
            CHAT,
            {"model": "m", "messages": [{"role": "user", "content": text}]},
        ),
    ):
        started = time.perf_counter()
        resp = await admission.admit(request(path), kind, payload)
        took = time.perf_counter() - started
        assert resp is not None and resp.status == 400
        assert took < 0.1, took
        got = body_of(resp)
        if path.startswith("/v1/"):
            assert got["object"] == "error" and got["code"] == 400
            assert got["type"] == "BadRequestError"
            assert "context length (32768 tokens)" in got["message"]
        else:
            assert set(got) == {"error"} and "context length" in got["error"]["message"]


def test_a_prompt_that_fits_passes_and_token_ids_are_counted_exactly() -> None:
    limits = Limits(LimitSettings(context_length=100, chars_per_token=10))
    assert limits.check(GENERATE, {"text": "y" * 990}) is None
    assert limits.check(GENERATE, {"text": "y" * 1001}) is not None
    assert limits.check(GENERATE, {"input_ids": list(range(99))}) is None
    why = limits.check(GENERATE, {"input_ids": list(range(100))})
    assert why == "The input (100 tokens) is longer than the model's context length (100 tokens)."
    # ids and text together share the context
    assert limits.check(GENERATE, {"input_ids": list(range(90)), "text": "z" * 200}) is not None


async def test_an_unknown_context_is_asked_of_the_primary_before_a_big_prompt(
    admission: Admission,
) -> None:
    """Right after the relay starts, a big prompt waits for the primary's
    max_model_len (SGLang's /v1/models) instead of slipping through."""
    asked: list[str] = []

    async def models(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"object": "list", "data": [{"id": "m", "max_model_len": 1000}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = TestServer(app)
    await server.start_server()
    admission.limits = Limits(LimitSettings())
    admission.topology.nodes["a"].engine_url = str(server.make_url("")).rstrip("/")
    try:
        assert await admission.admit(request("/generate"), GENERATE, {"text": "short"}) is None
        assert asked == [], "a short prompt never waits"
        resp = await admission.admit(request("/generate"), GENERATE, {"text": "x" * 20000})
        assert resp is not None and resp.status == 400
        assert asked == ["/v1/models"] and admission.limits.learnt_context == 1000
    finally:
        await admission.transport.close()
        await server.close()


def test_the_context_is_unknown_until_learnt_then_applies() -> None:
    limits = Limits(LimitSettings())
    assert limits.check(COMPLETIONS, {"prompt": "x" * 10_000_000}) is None
    limits.learnt_context = 1000
    assert limits.check(COMPLETIONS, {"prompt": "x" * 10_000_000}) is not None


def test_prompt_size_reads_every_prompt_shape() -> None:
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc"}]}]}
    assert prompt_size(CHAT, chat) == (3, 0)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * MB}}
    multimodal = {
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]
    }
    assert prompt_size(CHAT, multimodal) == (2, 0), "an image is not text tokens"
    assert prompt_size(COMPLETIONS, {"prompt": [[1, 2, 3]]}) == (0, 3)
    assert prompt_size(GENERATE, {"text": ["ab", "cde"]}) == (5, 0)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        (GENERATE, {"text": "q", "sampling_params": {"regex": NESTED}}),
        (COMPLETIONS, {"model": "m", "prompt": "q", "regex": NESTED}),
        (CHAT, {"model": "m", "messages": [{"role": "user", "content": "q"}], "regex": NESTED}),
    ],
)
async def test_a_nested_regex_is_refused_fast(
    admission: Admission, kind: str, payload: Any
) -> None:
    path = {GENERATE: "/generate", COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}
    started = time.perf_counter()
    resp = await admission.admit(request(path[kind]), kind, payload)
    assert time.perf_counter() - started < 0.1
    assert resp is not None and resp.status == 400
    assert "regex nests repeats" in json.dumps(body_of(resp))


def test_constraint_bounds() -> None:
    limits = Limits(LimitSettings(constraint_max_bytes=1000, constraint_max_depth=5))
    ok = {"text": "q", "sampling_params": {"regex": r"\d{1,10}-[a-z]{3,30}(?:,\w{1,50}){0,100}"}}
    assert limits.check(GENERATE, ok) is None
    assert "bytes" in (limits.check(GENERATE, {"sampling_params": {"ebnf": "a" * 1001}}) or "")
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(6):
        deep = {"type": "object", "properties": {"x": deep}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}
    assert "nested deeper" in (limits.check(CHAT, {"response_format": fmt}) or "")
    as_string = {"sampling_params": {"json_schema": json.dumps(deep)}}
    assert "nested deeper" in (limits.check(GENERATE, as_string) or "")
    assert constraints(CHAT, {"response_format": {"type": "json_object"}}) == []
    # not a regex at all: the engine's own error answers it
    assert limits.check(GENERATE, {"sampling_params": {"regex": "(unclosed"}}) is None


# -- shedding ----------------------------------------------------------------------------


async def test_a_saturated_primary_sheds_with_retry_after(admission: Admission) -> None:
    payload = {"text": "hi"}
    assert await admission.admit(request("/generate"), GENERATE, payload) is None
    admission.topology.nodes["a"].status = status(queued=16)
    resp = await admission.admit(request("/v1/completions"), COMPLETIONS, payload)
    assert resp is not None and resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    assert "saturated (16 requests queued, bound 16)" in body_of(resp)["message"]
    # the standby's queue is not the primary's
    admission.topology.nodes["a"].status = status(queued=3)
    admission.topology.nodes["b"].status = status(queued=1000)
    assert await admission.admit(request("/generate"), GENERATE, payload) is None


# -- quarantine --------------------------------------------------------------------------


def test_what_counts_as_a_node_dying_with_the_request() -> None:
    assert node_died(UpstreamFailure("abandoned: a failed: engine dead", FailureCause.ABANDONED))
    assert node_died(classify(aiohttp.ServerDisconnectedError()))
    assert node_died(classify(aiohttp.ClientPayloadError("payload not completed")))
    assert node_died(UpstreamFailure("stream ended without [DONE]", FailureCause.TRUNCATED))
    assert not node_died(UpstreamFailure("connect failed", FailureCause.CONNECT, connect=True))
    assert not node_died(classify(asyncio.TimeoutError()))
    assert not node_died(UpstreamFailure("HTTP 503", FailureCause.HTTP))
    # The engine's own words in an abort do not make it a crash.
    assert not node_died(
        UpstreamFailure("engine abort 500: connection closed", FailureCause.ENGINE_ABORT)
    )


def test_fingerprint_covers_prompt_and_constraints_not_sampling() -> None:
    a = {"text": "p", "sampling_params": {"regex": "x+", "temperature": 0.1}}
    b = {"text": "p", "sampling_params": {"regex": "x+", "temperature": 0.9}}
    c = {"text": "p", "sampling_params": {"regex": "y+"}}
    assert fingerprint(GENERATE, a) == fingerprint(GENERATE, b) != fingerprint(GENERATE, c)
    assert fingerprint(COMPLETIONS, {"prompt": "p"}) != fingerprint(CHAT, {"prompt": "p"})


def test_quarantine_expires() -> None:
    clock = FakeClock()
    q = Quarantine(ttl=60, clock=clock)
    assert not q and q.held("f") == 0
    q.hold("f")
    assert q.held("f") == 60
    clock.advance(61)
    assert q.held("f") == 0 and not q


def test_a_quarantine_is_shared_by_the_gateways_workers(tmp_path: Path) -> None:
    """A client's next attempt may land on any relay worker: all of them refuse it."""
    clock, wall = FakeClock(), FakeClock()
    wall.advance(1_000_000.0)
    one = Quarantine(ttl=60, clock=clock, shared=tmp_path / "q", wall=wall)
    two = Quarantine(ttl=60, clock=clock, shared=tmp_path / "q", wall=wall)
    assert not two
    one.hold("f")
    one.hold("g")  # a second hold within the folder's mtime tick is seen as well
    assert two and two.held("f") == 60 and two.held("g") == 60 and two.held("h") == 0
    clock.advance(61)
    wall.advance(61)
    assert two.held("f") == 0
    three = Quarantine(ttl=60, clock=clock, shared=tmp_path / "q", wall=wall)
    assert not three, "expired holds are not taken in (and their files go)"
    assert list((tmp_path / "q").iterdir()) == []


async def test_two_nodes_dying_with_a_request_quarantine_it(admission: Admission) -> None:
    payload = {"text": "boom", "sampling_params": {"max_new_tokens": 4}}
    req = request("/generate")
    assert await admission.admit(req, GENERATE, payload) is None
    broke = classify(aiohttp.ServerDisconnectedError())
    # First node: a re-send, at once (judged in the background).
    admission.topology.nodes["a"].failed = True
    assert await asyncio.wait_for(admission.node_failed(req, "a", broke), 0.05) is None
    # Identical requests on the same dead node are the same one failure.
    other = request("/generate")
    assert await admission.admit(other, GENERATE, payload) is None
    assert await admission.node_failed(other, "a", broke) is None
    # Second node: quarantined, with the event and the metric.
    admission.topology.nodes["b"].status = status(EngineState.DEAD)
    why = await admission.node_failed(req, "b", broke)
    assert why is not None and "quarantined" in why and "query of death" in why
    assert admission.metrics.quarantined._value.get() == 1
    assert any(e.event == "QUERY_QUARANTINED" for e in admission.events.recent)
    # Afterwards the same request is refused at admission: 503, saying why.
    resp = await admission.admit(request("/v1/completions"), COMPLETIONS, {"prompt": "x"})
    assert resp is None, "other requests pass"
    resp = await admission.admit(request("/generate"), GENERATE, payload)
    assert resp is not None and resp.status == 503
    assert "quarantined" in body_of(resp)["error"]["message"]


async def test_a_broken_connection_on_a_node_that_kept_serving_is_no_crash(
    admission: Admission,
) -> None:
    payload = {"text": "long story"}
    req = request("/generate")
    assert await admission.admit(req, GENERATE, payload) is None
    broke = classify(aiohttp.ClientPayloadError("payload not completed"))
    assert await admission.node_failed(req, "a", broke) is None
    assert await admission.node_failed(req, "b", broke) is None  # both stayed healthy
    assert not admission.quarantine
    assert (
        await admission.node_failed(
            req, "b", UpstreamFailure("connect failed", FailureCause.CONNECT, connect=True)
        )
        is None
    )


def test_every_new_setting_is_an_env_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HA_SHED_QUEUE_BOUND", "7")
    monkeypatch.setenv("HA_CONTEXT_LENGTH", "4096")
    monkeypatch.setenv("HA_QUARANTINE_TTL", "30")
    s = RelaySettings()
    assert (s.shed_queue_bound, s.context_length, s.quarantine_ttl) == (7, 4096, 30.0)


async def test_the_warmer_never_mirrors_a_big_prompt() -> None:
    from ha_agent.gateway.upstream.warming import Warmer

    sent: list[Any] = []

    class Topo:
        primary = "a"

        def __init__(self) -> None:
            self.nodes = {"b": NodeView("b", "http://b", "http://b", status=status())}

        @staticmethod
        def clock() -> float:
            return 0.0

    async def send(node: NodeView, path: str, body: dict[str, Any]) -> None:
        sent.append(body)

    warmer = Warmer(Topo(), None, rate=100, registry=None, max_chars=1000)  # type: ignore[arg-type]
    warmer._send = send  # type: ignore[method-assign]
    warmer.offer(GENERATE, {"text": "x" * 1001})
    warmer.offer(GENERATE, {"text": "y" * 999})
    await asyncio.sleep(0)
    assert [len(b["text"]) for b in sent] == [999]
