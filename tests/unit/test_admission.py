"""Admission at the relay (gateway/admission/limits.py, shedding.py, quarantine.py, admission.py):
what a client sees for a too-heavy request, a saturated primary and a query of death."""

from __future__ import annotations

import asyncio
import json
import socket
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
from ha_agent.gateway.admission.quarantine import Quarantine, Solo, fingerprint, node_died
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.upstream.topology import NodeView, Topology
from ha_agent.gateway.upstream.transport import FailureCause, Transport, UpstreamFailure, classify
from ha_agent.openapi.endpoints import CHAT, COMPLETIONS, GENERATE
from tests.support.fakes import FakeClock, FakeStore

NESTED = "(?:a{1000}){1000}"
MB = 1024 * 1024


def status(
    state: EngineState = EngineState.HEALTHY,
    queued: float = 0,
    exceptions: int = 0,
    oom: bool = False,
    exit_known: bool = False,
) -> AgentStatus:
    engine = EngineStatus(
        state=state, queued=queued, exceptions=exceptions, oom=oom, exit_known=exit_known
    )
    return AgentStatus(node="n", role=Role.PRIMARY, epoch=1, engine=engine)


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
        topology.took_status(node, status())
    adm = Admission(RelayParts(settings, topology, Transport(0.5, 60), RelayMetrics(), events))
    adm.confirm_s = 3.0
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


def crash(adm: Admission, name: str, exception: bool = True, **how: Any) -> None:
    """The node's engine died, as its agent reports it (with the engine's own exception
    in its output, or not) and the relay's topology judges it."""
    topo = adm.topology
    node = topo.nodes[name]
    before = node.exceptions_seen or 0
    state = how.pop("state", EngineState.DEAD)
    topo.took_status(node, status(state, exceptions=before + exception, **how))
    node.failed = True


def restart(adm: Admission, name: str) -> None:
    topo = adm.topology
    node = topo.nodes[name]
    topo.took_status(node, status(exceptions=node.exceptions_seen or 0))
    node.failed = False


BROKE = classify(aiohttp.ServerDisconnectedError())


async def admitted(adm: Admission, prompt: str) -> web.Request:
    req = request("/generate")
    payload = {"text": prompt, "sampling_params": {"max_new_tokens": 4}}
    assert await adm.admit(req, GENERATE, payload) is None
    return req


async def sent(adm: Admission, req: web.Request, timeout: float = 2.0) -> set[str]:
    """The request goes out (attempt() let it); the nodes it avoids."""
    avoid, why = await asyncio.wait_for(adm.attempt(req), timeout)
    assert why is None, why
    return avoid


async def held_back(adm: Admission, req: web.Request) -> bool:
    """attempt() still holds the request back after a moment (bounded); then the
    client gives up on it."""
    try:
        await asyncio.wait_for(adm.attempt(req), 0.3)
    except asyncio.TimeoutError:
        return True
    return False


def held(adm: Admission, prompt: str) -> bool:
    fp = fingerprint(GENERATE, {"text": prompt, "sampling_params": {"max_new_tokens": 4}})
    return adm.quarantine.held(fp) > 0


async def test_only_the_culprit_is_quarantined_and_never_both_engines_down(
    admission: Admission,
) -> None:
    """Three requests in prefill on a when its engine crashed of its own exception:
    none is re-sent while b alone serves; then one at a time, the culprit first on b,
    whose crash with it alone quarantines it; the two others are served."""
    adm = admission
    culprit, one, two = [await admitted(adm, p) for p in ("boom", "hello", "world")]
    for req in (culprit, one, two):
        await sent(adm, req)
    crash(adm, "a")
    verdicts = await asyncio.gather(*(adm.node_failed(r, "a", BROKE) for r in (culprit, one, two)))
    assert verdicts == [None, None, None], "suspects, not culprits: one crash proves nothing"
    # b alone serves: a second crash would leave no engine, so nothing goes.
    assert await held_back(adm, culprit)
    restart(adm, "a")
    assert await sent(adm, culprit) == {"a"}, "alone, and to the node it did not crash"
    assert await held_back(adm, one), "one suspect at a time"
    crash(adm, "b")
    why = await adm.node_failed(culprit, "b", BROKE)
    assert why is not None and "quarantined" in why and "query of death" in why
    assert adm.metrics.quarantined._value.get() == 1
    assert [e.event for e in adm.events.recent].count("QUERY_QUARANTINED") == 1
    assert await held_back(adm, one), "b is down now: a waits for it"
    restart(adm, "b")
    await sent(adm, one)
    assert await held_back(adm, two)
    adm.progressed(one)  # its first event: past its prefill
    await sent(adm, two)
    adm.done(two)
    assert held(adm, "boom") and not held(adm, "hello") and not held(adm, "world")
    resp = await adm.admit(request("/generate"), GENERATE, {"text": "boom"})
    assert resp is None, "another prompt passes (the fingerprint covers sampling_params too)"
    again = request("/generate")
    resp = await adm.admit(
        again, GENERATE, {"text": "boom", "sampling_params": {"max_new_tokens": 4}}
    )
    assert resp is not None and resp.status == 503
    assert "quarantined" in body_of(resp)["error"]["message"]


async def test_a_request_that_received_tokens_is_no_suspect(admission: Admission) -> None:
    adm = admission
    streamed = await admitted(adm, "a story")
    await sent(adm, streamed)
    crash(adm, "a")
    # No wait for the cause: it was past its prefill there, so it moves on at once.
    verdict = adm.node_failed(streamed, "a", BROKE, received=True)
    assert await asyncio.wait_for(verdict, 0.05) is None
    assert await sent(adm, streamed, timeout=0.05) == set()
    restart(adm, "a")
    await sent(adm, streamed)
    crash(adm, "b")
    assert await adm.node_failed(streamed, "b", BROKE, received=True) is None
    assert not adm.quarantine and adm.metrics.quarantined._value.get() == 0


@pytest.mark.parametrize(
    "how",
    [
        {},  # kill -9: dead, no exception in its output
        {"oom": True},
        {"state": EngineState.HUNG},
        {"agent_lost": True},
    ],
    ids=["kill", "oom-kill", "hang", "lost-node"],
)
async def test_no_request_is_blamed_for_a_kill_an_oom_a_hang_or_a_lost_node(
    admission: Admission, how: dict[str, Any]
) -> None:
    """Every request on it is re-sent as in any failover, suspects or not."""
    adm = admission
    req = await admitted(adm, "boom")
    await sent(adm, req)
    agent_lost = how.pop("agent_lost", False)
    crash(adm, "a", exception=False, **how)
    if agent_lost:
        adm.topology.nodes["a"].status = None
    started = time.monotonic()
    assert await adm.node_failed(req, "a", BROKE) is None
    assert time.monotonic() - started < 2.5, "decided within the grace, not the deadline"
    assert await sent(adm, req, timeout=0.05) == set(), "re-sent at once, b alone serving"
    crash(adm, "b", exception=False, **how)
    assert await adm.node_failed(req, "b", BROKE) is None
    assert not adm.quarantine


@pytest.mark.parametrize("exception", [False, True], ids=["kill", "own-exception"])
async def test_a_death_the_agent_has_read_to_its_end_is_judged_at_once(
    admission: Admission, exception: bool
) -> None:
    """The agent says it read the dead run's output to its end (exit_known): a kill is
    a kill at once, no grace; the engine's own exception still makes a suspect."""
    adm = admission
    req = await admitted(adm, "boom")
    await sent(adm, req)
    crash(adm, "a", exception=exception, exit_known=True)
    started = time.monotonic()
    assert await adm.node_failed(req, "a", BROKE) is None
    took = time.monotonic() - started
    assert took < 0.5, f"{took:.2f}s: waited as if the agent could not tell"
    if exception:
        assert adm.topology.nodes["a"].exception_seen_at > 0
        assert await held_back(adm, req), "a suspect waits for two nodes serving"
    else:
        assert await sent(adm, req, timeout=0.05) == set(), "re-sent at once, b serving"
    assert not adm.quarantine


async def test_a_death_not_yet_read_to_its_end_waits_for_the_grace(admission: Admission) -> None:
    """Down without exit_known (a death seen by HTTP first, a sidecar's log): a count
    that rises within the grace still makes a suspect, not a re-send."""
    adm = admission
    req = await admitted(adm, "boom")
    await sent(adm, req)
    crash(adm, "a", exception=False)
    verdict = asyncio.ensure_future(adm.node_failed(req, "a", BROKE))
    await asyncio.sleep(0.6)
    assert not verdict.done(), "judged before the agent could have read the output"
    node = adm.topology.nodes["a"]
    adm.topology.took_status(
        node, status(EngineState.DEAD, exceptions=(node.exceptions_seen or 0) + 1, exit_known=True)
    )
    assert await asyncio.wait_for(verdict, 1.0) is None
    assert await held_back(adm, req), "a suspect: the count rose"


async def test_the_standby_hung_then_the_primary_killed_quarantine_nothing(
    admission: Admission,
) -> None:
    """Two nodes failing for two reasons is not one request killing both."""
    adm = admission
    reqs = [await admitted(adm, f"prompt {i}") for i in range(16)]
    for req in reqs:
        await sent(adm, req)
    crash(adm, "b", exception=False, state=EngineState.HUNG)
    crash(adm, "a", exception=False)
    verdicts = await asyncio.gather(*(adm.node_failed(r, "a", BROKE) for r in reqs))
    assert verdicts == [None] * 16
    for req in reqs:
        assert await sent(adm, req, timeout=0.05) == set()
    assert not adm.quarantine and adm.metrics.quarantined._value.get() == 0


async def test_a_suspect_held_back_too_long_is_refused_not_quarantined(
    admission: Admission,
) -> None:
    adm = admission
    adm.suspect_wait = 0.5
    req = await admitted(adm, "hello")
    await sent(adm, req)
    crash(adm, "a")
    assert await adm.node_failed(req, "a", BROKE) is None
    _, why = await asyncio.wait_for(adm.attempt(req), 2.0)
    assert why is not None and "not quarantined" in why
    assert not adm.quarantine


async def test_a_broken_connection_on_a_node_that_kept_serving_is_no_crash(
    admission: Admission,
) -> None:
    adm = admission
    adm.confirm_s = 0.3
    req = await admitted(adm, "long story")
    broke = classify(aiohttp.ClientPayloadError("payload not completed"))
    await sent(adm, req)
    assert await adm.node_failed(req, "a", broke) is None
    await sent(adm, req, timeout=0.05)
    assert await adm.node_failed(req, "b", broke) is None  # both stayed healthy
    assert not adm.quarantine
    connect = UpstreamFailure("connect failed", FailureCause.CONNECT, connect=True)
    assert await asyncio.wait_for(adm.node_failed(req, "b", connect), 0.05) is None


async def test_a_connection_broken_on_an_engine_still_answering_is_re_sent_at_once(
    admission: Admission,
) -> None:
    """A stale keep-alive on a live engine: no crash, no wait for the agent's word."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        admission.topology.nodes["a"].engine_url = f"http://127.0.0.1:{port}"
        req = await admitted(admission, "hello")
        await sent(admission, req)
        assert await asyncio.wait_for(admission.node_failed(req, "a", BROKE), 0.6) is None
        assert await sent(admission, req, timeout=0.05) == set()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_crash_whose_port_still_accepts_while_it_exits_is_judged_by_the_agent(
    admission: Admission,
) -> None:
    """A port that completes a connect but never answers, as a killed engine's can
    while it exits: not taken for a live engine. The agent's count of exceptions
    rises, so the request is a suspect and is not re-sent to the other node at once."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # never accepted: the kernel completes connects on the backlog
    try:
        admission.topology.nodes["a"].engine_url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        req = await admitted(admission, "boom")
        await sent(admission, req)
        verdict = asyncio.ensure_future(admission.node_failed(req, "a", BROKE))
        await asyncio.sleep(0.05)  # the agent's next poll shows the engine's exception
        crash(admission, "a")
        assert await asyncio.wait_for(verdict, 2.0) is None
        assert await held_back(admission, req), "a suspect: not sent while b alone serves"
    finally:
        listener.close()


async def test_one_suspect_at_a_time_across_the_relay_workers(tmp_path: Path) -> None:
    one, two = Solo(tmp_path), Solo(tmp_path)
    first = await one.acquire(1.0)
    assert first is not None
    assert await two.acquire(0.2) is None, "the other worker waits"
    first.release()
    first.release()  # idempotent
    second = await two.acquire(1.0)
    assert second is not None
    second.release()


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
