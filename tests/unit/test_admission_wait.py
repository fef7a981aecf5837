"""Admission by expected wait (gateway/admission/wait.py): the estimate and the 429
a client sees when the wait on the node its request would go to is past the bound."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer, make_mocked_request

from ha_agent.config import HaMode, RelaySettings
from ha_agent.dcs.base import AgentStatus, EngineState, EngineStatus, Role
from ha_agent.events import EventLog
from ha_agent.gateway.admission import gate
from ha_agent.gateway.admission.gate import Admission, RelayParts
from ha_agent.gateway.admission.wait import (
    MIN_SAMPLES,
    RETRY_AFTER_MAX,
    WaitEstimator,
    all_serving,
    ask_slots,
    parse_slots,
)
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.stream import relay
from ha_agent.gateway.upstream.affinity import Affinity, affinity_of
from ha_agent.gateway.upstream.topology import Abandonable, NodeView, Topology
from ha_agent.gateway.upstream.transport import Transport
from ha_agent.openapi.endpoints import CHAT, GENERATE
from ha_agent.sim.server import create_app
from tests.support.fakes import FakeClock, FakeStore
from tests.unit.conftest import make_sim_settings

BOUND = 10.0


def status(running: float = 0, queued: float = 0, role: Role = Role.PRIMARY) -> AgentStatus:
    engine = EngineStatus(state=EngineState.HEALTHY, running=running, queued=queued)
    return AgentStatus(node="n", role=role, epoch=1, engine=engine)


class _Held(Abandonable):
    def abandon(self, reason: str) -> None:
        pass


def topology(tmp_path: Any, clock: FakeClock | None = None, **overrides: Any) -> Topology:
    settings = RelaySettings(
        nodes=["a=http://a:1=http://a:2", "b=http://b:1=http://b:2"],
        context_length=32768,
        ha_log=str(tmp_path / "ha.log"),
        **overrides,
    )
    events = EventLog(str(tmp_path / "ha.log"), "relay")
    topo = Topology(settings, FakeStore(FakeClock()), events, clock=clock or FakeClock())
    topo.primary = "a"
    for node in topo.nodes.values():
        topo.took_status(node, status())
    return topo


def report(topo: Topology, name: str, running: float, queued: float) -> NodeView:
    node = topo.nodes[name]
    topo.took_status(node, status(running, queued))
    return node


def measured(
    est: WaitEstimator, node: str, seconds: float, n: int = MIN_SAMPLES, budget: int = 128
) -> None:
    """Completed requests of `budget` tokens (128: /generate's default)."""
    for _ in range(n):
        est.served(node, seconds, budget)


@pytest.fixture
def admission(tmp_path: Any) -> Admission:
    topo = topology(tmp_path, shed_wait_bound=BOUND, shed_retry_after=2)
    parts = RelayParts(topo.s, topo, Transport(0.5, 60), RelayMetrics(), topo.events)
    adm = Admission(parts)
    adm.wait.slots = {"a": 4, "b": 4}
    return adm


# -- the estimate ------------------------------------------------------------------------


def test_the_wait_rises_with_the_queue(tmp_path: Any) -> None:
    est = WaitEstimator(topology(tmp_path), BOUND)
    est.slots["a"] = 4
    measured(est, "a", 8.0)  # 8 s per request on 4 slots: a slot frees every 2 s
    waits = []
    for queued in (0, 1, 3, 7, 15):
        node = report(est.topology, "a", 4, queued)
        e = est.estimate(node)
        assert e is not None
        waits.append(e.wait)
    # The new request needs every request queued ahead of it, and itself, to find a slot.
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0]


def test_the_wait_falls_as_requests_finish(tmp_path: Any) -> None:
    est = WaitEstimator(topology(tmp_path), BOUND)
    est.slots["a"] = 4
    measured(est, "a", 8.0)
    node = report(est.topology, "a", 0, 0)  # the engine's gauges lag a burst
    held = [_Held() for _ in range(12)]  # this worker's own requests on the node
    node.inflight.update(held)
    waits = []
    for left in (12, 8, 5, 4, 3):
        node.inflight.clear()
        node.inflight.update(held[:left])
        e = est.estimate(node)
        assert e is not None
        waits.append(e.wait)
    assert waits == [18.0, 10.0, 4.0, 2.0, 0.0]
    # The engine's own report counts too: its queue draining lowers the wait.
    node.inflight.clear()
    assert [est.estimate(report(est.topology, "a", 4, q)).wait for q in (6, 2, 0)] == [  # type: ignore[union-attr]
        14.0,
        6.0,
        2.0,
    ]
    assert est.estimate(report(est.topology, "a", 2, 0)).wait == 0.0  # type: ignore[union-attr]


def test_an_unknown_service_time_sheds_nothing(tmp_path: Any) -> None:
    """No request finished yet: the wait cannot be told, so no one is refused on a guess."""
    est = WaitEstimator(topology(tmp_path), BOUND)
    est.slots["a"] = 4
    node = report(est.topology, "a", 4, 500)
    assert est.estimate(node) is None
    best, complete = est.least()
    assert not est.refuses(best, complete)
    measured(est, "a", 8.0, n=MIN_SAMPLES - 1)  # too few to go by
    assert est.estimate(node) is None
    est.served("a", 8.0, 128)
    assert est.estimate(node) is not None


def test_a_full_kv_pool_limits_capacity_to_what_runs(tmp_path: Any) -> None:
    """A queue while running < slots: memory, not slots, is the limit (SGLang admits a
    request only when its KV fits, schedule_policy.py)."""
    clock = FakeClock()
    est = WaitEstimator(topology(tmp_path, clock=clock), BOUND)
    est.slots["a"] = 16
    measured(est, "a", 8.0)
    # A burst being admitted over a few prefill batches first: slots still count.
    e = est.estimate(report(est.topology, "a", 4, 3))
    assert e is not None and e.queue.slots == 16 and e.wait == 0.0
    clock.advance(1.0)
    e = est.estimate(report(est.topology, "a", 4, 3))
    assert e is not None and e.wait == 0.0
    clock.advance(1.0)  # a queue that lasts with slots free: the KV pool is full
    e = est.estimate(report(est.topology, "a", 4, 3))
    assert e is not None and e.queue.slots == 4 and e.wait == 8.0
    # Slots unknown (/server_info not answered yet): the same inference from a queue...
    est.slots.clear()
    e = est.estimate(report(est.topology, "a", 4, 3))
    assert e is not None and e.wait == 8.0
    # ...and no queue reported means room, as far as anyone knows.
    e = est.estimate(report(est.topology, "a", 4, 0))
    assert e is not None and e.wait == 0.0


def test_a_node_without_samples_takes_the_clusters_service_time(tmp_path: Any) -> None:
    """A standby promoted by a failover has served nothing through this relay yet."""
    est = WaitEstimator(topology(tmp_path), BOUND)
    est.slots = {"a": 4, "b": 4}
    measured(est, "a", 8.0)
    e = est.estimate(report(est.topology, "b", 4, 3))
    assert e is not None and e.service == 8.0 and e.wait == 8.0
    measured(est, "b", 4.0, n=20)  # its own, once it has some
    e = est.estimate(report(est.topology, "b", 4, 3))
    assert e is not None and e.service == pytest.approx(4.0)


def test_the_service_time_follows_recent_requests(tmp_path: Any) -> None:
    est = WaitEstimator(topology(tmp_path), BOUND)
    measured(est, "a", 2.0, n=10)
    assert est.service.of("a") == pytest.approx(2.0)
    measured(est, "a", 20.0, n=30)
    assert est.service.of("a") == pytest.approx(20.0, rel=0.1)
    est.served("a", float("nan"), 128)
    est.served("a", -1.0, 128)
    assert est.service.of("a") == pytest.approx(20.0, rel=0.1)


def test_running_slots_are_read_as_sglang_reports_them() -> None:
    """`/server_info`: `internal_states[*].effective_max_running_requests_per_dp`, one
    entry per DP rank (srt/managers/scheduler.py `get_internal_state`); the flag
    `max_running_requests` is None unless given."""
    dp2 = {
        "max_running_requests": None,
        "internal_states": [
            {"effective_max_running_requests_per_dp": 48},
            {"effective_max_running_requests_per_dp": 48},
        ],
    }
    assert parse_slots(dp2) == 96
    assert parse_slots({"max_running_requests": 32, "internal_states": [{}]}) == 32
    assert parse_slots({"max_running_requests": None, "internal_states": []}) is None
    assert parse_slots({"max_running_requests": True}) is None
    assert parse_slots([1, 2]) is None


async def test_the_slots_are_learnt_from_the_engine(tmp_path: Any) -> None:
    sim = TestServer(create_app(make_sim_settings(max_running_requests=6)))
    await sim.start_server()
    transport = Transport(0.5, 60)
    try:
        topo = topology(tmp_path)
        topo.nodes["a"].engine_url = str(sim.make_url("")).rstrip("/")
        est = WaitEstimator(topo, BOUND)
        assert await ask_slots(est, topo.nodes["a"], transport) == 6
        assert est.slots == {"a": 6}
        assert await ask_slots(est, topo.nodes["b"], transport, timeout=0.5) is None
    finally:
        await transport.close()
        await sim.close()


def test_a_pool_sheds_only_when_its_least_wait_node_is_past_the_bound(tmp_path: Any) -> None:
    est = WaitEstimator(topology(tmp_path), BOUND, candidates=all_serving)
    est.slots = {"a": 4, "b": 4}
    measured(est, "a", 8.0)
    report(est.topology, "a", 4, 40)
    report(est.topology, "b", 4, 1)
    best, complete = est.least()
    assert best is not None and best.node == "b" and not est.refuses(best, complete)
    report(est.topology, "b", 4, 20)
    best, complete = est.least()
    assert best is not None and best.node == "b" and best.wait == 42.0
    assert est.refuses(best, complete)
    # A node that cannot be estimated may have room: nobody is refused for the others.
    # (Here: its slots not learnt yet, and a queue reported with nothing running.)
    del est.slots["b"]
    report(est.topology, "b", 0, 5)
    best, complete = est.least()
    assert best is not None and best.node == "a" and not complete
    assert not est.refuses(best, complete)


# -- the refusal -------------------------------------------------------------------------


def request(path: str) -> web.Request:
    return make_mocked_request("POST", path)


def body_of(resp: web.Response) -> Any:
    assert isinstance(resp.body, bytes)
    return json.loads(resp.body)


async def test_a_request_past_the_bound_gets_429_with_retry_after_at_once(
    admission: Admission,
) -> None:
    measured(admission.wait, "a", 8.0)
    report(admission.topology, "a", 4, 3)  # 8 s: under the bound
    assert await admission.admit(request("/generate"), GENERATE, {"text": "hi"}) is None
    report(admission.topology, "a", 4, 9)  # 20 s
    for path, kind, payload in (
        ("/generate", GENERATE, {"text": "hi"}),
        (
            "/v1/chat/completions",
            CHAT,
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        ),
    ):
        started = time.perf_counter()
        resp = await admission.admit(request(path), kind, payload)
        took = time.perf_counter() - started
        assert resp is not None and resp.status == 429 and took < 0.1
        # The time the wait needs to fall back under the bound, spread by up to half.
        told = int(resp.headers["Retry-After"])
        assert 10 <= told <= 15
        # And within that second for the clients that read milliseconds (the SDKs).
        assert told * 1000 <= int(resp.headers["retry-after-ms"]) < told * 1000 + 1000
        got = body_of(resp)
        if path.startswith("/v1/"):
            assert got["object"] == "error" and got["code"] == 429
            message = got["message"]
        else:
            message = got["error"]["message"]
        assert "expected queue wait on a is 20s" in message and "bound of 10s" in message
    refused = admission.metrics.refused.labels(GENERATE, "wait")._value.get()
    assert refused == 1
    # Retry-After: at least HA_SHED_RETRY_AFTER, at most what the OpenAI SDK honours,
    # and spread: a burst refused together does not come back together.
    report(admission.topology, "a", 4, 4)  # 10 s: past the bound barely
    admission.wait.bound = 9.5
    best, _ = admission.wait.least()
    assert best is not None
    assert {admission.wait.retry_after(best, 2) for _ in range(200)} == {2, 3}
    report(admission.topology, "a", 4, 400)
    best, _ = admission.wait.least()
    assert best is not None and admission.wait.retry_after(best, 2) == RETRY_AFTER_MAX
    report(admission.topology, "a", 4, 39)  # 80 s: 70 to go, and the spread
    best, _ = admission.wait.least()
    assert best is not None
    assert {admission.wait.retry_after(best, 2) for _ in range(200)} == {RETRY_AFTER_MAX}
    report(admission.topology, "a", 4, 21)  # 44 s: 35 to go (34.5), up to 17 more
    best, _ = admission.wait.least()
    assert best is not None
    assert {admission.wait.retry_after(best, 2) for _ in range(400)} == set(range(35, 53))
    # In milliseconds, spread over the whole second told, never past what the SDK honours.
    ms = [admission.wait.retry_after_ms(2) for _ in range(400)]
    assert min(ms) >= 2000 and max(ms) <= 2999 and len(set(ms)) > 300
    assert admission.wait.retry_after_ms(RETRY_AFTER_MAX) == RETRY_AFTER_MAX * 1000


async def test_refusals_are_one_episode_in_the_event_log_not_a_line_each(
    admission: Admission, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(gate.time, "monotonic", clock)
    measured(admission.wait, "a", 8.0)
    report(admission.topology, "a", 4, 20)
    for _ in range(50):
        resp = await admission.admit(request("/generate"), GENERATE, {"text": "hi"})
        assert resp is not None and resp.status == 429
        clock.advance(0.1)
    report(admission.topology, "a", 4, 0)
    assert await admission.admit(request("/generate"), GENERATE, {"text": "hi"}) is None
    events = [e.event for e in admission.events.recent]
    assert events.count("SHEDDING_STARTED") == 1 and "SHEDDING_STOPPED" not in events
    clock.advance(gate._Episode.QUIET)
    assert await admission.admit(request("/generate"), GENERATE, {"text": "hi"}) is None
    stopped = [e for e in admission.events.recent if e.event == "SHEDDING_STOPPED"]
    assert len(stopped) == 1 and "50 requests refused" in stopped[0].detail


async def test_refusal_by_wait_is_off_at_bound_zero(admission: Admission) -> None:
    admission.wait.bound = 0
    measured(admission.wait, "a", 8.0)
    report(admission.topology, "a", 4, 200)  # under the queue bound (256)
    assert await admission.admit(request("/generate"), GENERATE, {"text": "hi"}) is None


async def test_served_requests_measure_the_service_time(
    admission: Admission, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream from its first event to its end; a non-streaming request whole, only
    when it found a slot free at admission and was not retried."""
    clock = FakeClock()
    monkeypatch.setattr(gate.time, "monotonic", clock)
    wait = admission.wait

    async def admitted() -> web.Request:
        req = request("/generate")
        assert await admission.admit(req, GENERATE, {"text": "hi"}) is None
        await admission.attempt(req)
        return req

    report(admission.topology, "a", 1, 0)  # a slot free
    for _ in range(MIN_SAMPLES):
        req = await admitted()
        clock.advance(5.0)
        admission.served(req, "a")
    assert wait.service.of("a") == pytest.approx(5.0)
    # Queued at admission: its time holds a wait, not a service time.
    report(admission.topology, "a", 4, 2)
    req = await admitted()
    clock.advance(60.0)
    admission.served(req, "a")
    assert wait.service.of("a") == pytest.approx(5.0)
    # A stream: from its first event.
    req = await admitted()
    first = clock()
    clock.advance(7.0)
    admission.served(req, "a", first_event_at=first)
    assert wait.service.of("a") == pytest.approx(5.5)


def test_the_bound_is_an_env_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HA_SHED_WAIT_BOUND", "7.5")
    assert RelaySettings().shed_wait_bound == 7.5
    assert RelaySettings.model_fields["shed_wait_bound"].default == 10.0
    assert math.isfinite(RelaySettings().shed_wait_bound)


async def test_the_estimate_per_node_is_a_gauge(admission: Admission) -> None:
    from prometheus_client import generate_latest

    measured(admission.wait, "a", 8.0)
    report(admission.topology, "a", 4, 9)
    text = generate_latest(admission.metrics.registry).decode()
    assert 'sglang_ha_relay_expected_wait_seconds{node="a"} 20.0' in text
    assert 'sglang_ha_relay_service_time_seconds{node="a"} 8.0' in text


async def test_requests_between_attempts_count_on_the_node_they_go_to_next(
    admission: Admission,
) -> None:
    """A failover: the lost node's requests are re-sent to the survivor, some only once
    the relay knows how the node died; meanwhile the survivor looks idle."""
    measured(admission.wait, "a", 8.0)
    node = report(admission.topology, "a", 0, 0)
    requests = []
    for _ in range(6):
        req = request("/generate")
        assert await admission.admit(req, GENERATE, {"text": "hi"}) is None
        requests.append(req)
    e = admission.wait.estimate(node)
    # Sent on together, four take the slots and leave together 8 s later: a new
    # request waits 8 s, not the (6 - 4 + 1) * 8 / 4 = 6 s of requests spread over T.
    assert e is not None and e.queue.outstanding == 6 and e.wait == 8.0
    node.inflight.update(_Held() for _ in range(2))  # two of them back on a node
    assert admission.wait.estimate(node).queue.outstanding == 6  # type: ignore[union-attr]
    for req in requests:
        admission.done(req)
        admission.done(req)  # once is what counts
    node.inflight.clear()
    assert admission.wait.estimate(node).wait == 0.0  # type: ignore[union-attr]
    assert admission.alive == 0


async def test_a_queue_of_long_generations_behind_short_answers_is_not_taken_for_short(
    admission: Admission,
) -> None:
    """A mean over completions is dominated by short requests, which finish often; the
    requests outstanding may be long ones. Their budgets scale the service time."""
    measured(admission.wait, "a", 0.2, n=20, budget=16)  # a side load of 16-token answers
    node = report(admission.topology, "a", 0, 0)
    long = {"text": "hi", "sampling_params": {"max_new_tokens": 2000}}
    admitted = 0
    while await admission.admit(request("/generate"), GENERATE, long) is None:
        admitted += 1
        assert admitted < 100, "long generations taken for 0.2 s ones"
    # 25 s each (0.2 s * 2000 / 16) on 4 slots, all about to start together: the 5th
    # would wait for the first four to end, 25 s.
    assert admitted == 4
    e = admission.wait.estimate(node)
    assert e is not None and e.service == pytest.approx(25.0) and e.wait == pytest.approx(25.0)


def test_a_worker_counts_its_share_times_the_relay_workers(tmp_path: Any) -> None:
    """Nginx spreads a burst over the relay workers; each sees only its share while the
    engine's report lags."""
    est = WaitEstimator(topology(tmp_path), BOUND)
    est.slots["a"] = 4
    measured(est, "a", 8.0)
    node = report(est.topology, "a", 0, 0)
    node.inflight.update(_Held() for _ in range(3))
    assert est.estimate(node).queue.outstanding == 3  # type: ignore[union-attr]
    est.workers = 2
    e = est.estimate(node)
    assert e is not None and e.queue.outstanding == 6 and e.wait == 6.0
    report(est.topology, "a", 4, 5)  # the engine's count, once it shows, when higher
    assert est.estimate(node).queue.outstanding == 9  # type: ignore[union-attr]


class _Sent(Abandonable):
    def __init__(self, since: float) -> None:
        self.since = since

    def abandon(self, reason: str) -> None:
        pass


async def test_requests_behind_a_batch_that_started_together_wait_for_the_whole_batch(
    admission: Admission,
) -> None:
    """A burst that took every slot at once frees them at once: a request queued behind
    it waits the batch's whole service time, not T / C. Spread over T as the formula
    assumes, the same queue is the short wait the formula gives."""
    measured(admission.wait, "a", 12.0)  # 12 s per request on 4 slots, bound 10 s
    node = report(admission.topology, "a", 4, 0)
    now = admission.topology.clock()
    node.inflight.update(_Sent(now) for _ in range(4))  # sent together, just now
    e = admission.wait.estimate(node)
    # The formula alone says (4 - 4 + 1) * 12 / 4 = 3 s; the first slot frees in 12 s.
    assert e is not None and e.wait == pytest.approx(12.0)
    resp = await admission.admit(request("/generate"), GENERATE, {"text": "hi"})
    assert resp is not None and resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 2

    node.inflight.clear()
    node.inflight.update(_Sent(now - started) for started in (0.0, 3.0, 6.0, 9.0))
    e = admission.wait.estimate(node)
    assert e is not None and e.wait == pytest.approx(3.0)  # one leaves every 3 s
    assert await admission.admit(request("/generate"), GENERATE, {"text": "hi"}) is None


def test_a_batch_started_together_holds_back_the_queue_behind_it_by_waves(
    tmp_path: Any,
) -> None:
    """Eight sent together on 4 slots: four run, four queue; a ninth starts only when
    the second wave ends. Requests of unknown start are taken as spread."""
    clock = FakeClock()
    est = WaitEstimator(topology(tmp_path, clock=clock), 30.0)
    est.slots["a"] = 4
    measured(est, "a", 8.0)
    node = report(est.topology, "a", 0, 0)
    node.inflight.update(_Sent(clock()) for _ in range(8))
    e = est.estimate(node)
    assert e is not None and e.wait == pytest.approx(16.0)  # the formula: 10 s
    clock.advance(5.0)
    assert est.estimate(node).wait == pytest.approx(11.0)  # type: ignore[union-attr]
    # Two relay workers: each request here stands for two, sixteen in four waves of
    # four; the fourth ends 32 s after they were sent (the formula: 26 s from now).
    est.workers = 2
    assert est.estimate(node).wait == pytest.approx(27.0)  # type: ignore[union-attr]
    est.workers = 1
    # Overdue (running past the average): they leave any moment, the formula decides.
    clock.advance(20.0)
    assert est.estimate(node).wait == pytest.approx(10.0)  # type: ignore[union-attr]


async def test_a_pool_measures_requests_on_every_node_that_had_a_slot_free(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool routes by load, not by the estimate: of requests admitted together while
    both nodes are idle, half land on the node the estimate did not name. Each is a
    clean service time all the same, so one relay worker's share of a warm-up (4 of 8
    over two workers) is enough to estimate, and the first burst is shed."""
    clock = FakeClock()
    monkeypatch.setattr(gate.time, "monotonic", clock)
    topo = topology(tmp_path, shed_wait_bound=BOUND, mode=HaMode.POOL)
    parts = RelayParts(topo.s, topo, Transport(0.5, 60), RelayMetrics(), topo.events)
    admission = Admission(parts)
    admission.wait.slots = {"a": 4, "b": 4}
    warm_up = []
    for node in ("a", "b", "a", "b"):  # the pool's least-in-flight spread
        req = request("/generate")
        assert await admission.admit(req, GENERATE, {"text": "hi"}) is None
        await admission.attempt(req)
        warm_up.append((req, node))
    clock.advance(8.0)
    for req, node in warm_up:
        admission.served(req, node)
        admission.done(req)
    assert admission.wait.service.of("a") == pytest.approx(8.0)
    assert admission.wait.service.of("b") == pytest.approx(8.0)
    # A burst both engines report: each node's 4 slots busy and 12 queued (24 s).
    report(topo, "a", 4, 12)
    report(topo, "b", 4, 12)
    resp = await admission.admit(request("/generate"), GENERATE, {"text": "hi"})
    assert resp is not None and resp.status == 429


class _Stream(_Sent):
    stream = True

    def __init__(self, since: float, began: float | None = None, budget: int | None = None) -> None:
        super().__init__(since)
        self.began = began
        self.budget = budget


def test_a_stream_counts_from_when_the_engine_began_it_not_from_when_it_was_sent(
    tmp_path: Any,
) -> None:
    """A pool's survivor inherits the lost node's streams behind its own: re-sent 40 s
    ago, they sat in its queue and began only now. They hold the slots for another
    T; taken from when they were sent, they looked about to leave, and a new request
    was let in to wait a whole generation (the CPU stack's pool of two: 19 s against
    a 10 s bound)."""
    clock = FakeClock()
    est = WaitEstimator(topology(tmp_path, clock=clock), BOUND)
    est.slots["a"] = 8
    measured(est, "a", 12.0)
    node = report(est.topology, "a", 8, 0)
    sent = clock() - 40.0
    node.inflight.update(_Stream(sent, began=clock() - 1.0) for _ in range(8))
    e = est.estimate(node)
    assert e is not None and e.wait == pytest.approx(11.0)  # the first slot frees in 11 s
    assert est.refuses(e, complete=True)

    # Nothing back from them yet: queued, they start no sooner than now.
    node.inflight.clear()
    node.inflight.update(_Stream(sent) for _ in range(8))
    report(est.topology, "a", 0, 8)
    e = est.estimate(node)
    assert e is not None and e.wait == pytest.approx(12.0)

    # A request that is no stream shows no start: when it was sent is all there is.
    node.inflight.clear()
    node.inflight.update(_Sent(sent) for _ in range(8))
    report(est.topology, "a", 8, 0)
    e = est.estimate(node)
    assert e is not None and e.wait == pytest.approx(1.5)  # the formula: 1 x 12 / 8


def pool_worker(tmp_path: Any, clock: FakeClock) -> Admission:
    """One relay worker of two in a pool of two engines with 8 slots each, that has
    measured 11 s per 2,000-token stream (the CPU stack's wait-shedding test)."""
    topo = topology(tmp_path, clock=clock, shed_wait_bound=BOUND, mode=HaMode.POOL)
    parts = RelayParts(topo.s, topo, Transport(0.5, 60), RelayMetrics(), topo.events)
    admission = Admission(parts)
    admission.wait.slots = {"a": 8, "b": 8}
    admission.wait.workers = 2
    for name in ("a", "b"):
        measured(admission.wait, name, 11.0, budget=2000)
    return admission


async def admit_and_route(
    admission: Admission, body: dict[str, Any], affinity: Affinity | None = None
) -> NodeView | None:
    """One request as the relay takes it: admitted (else None), routed to a node for
    its first attempt, and on that node's engine, queued (nothing back yet)."""
    req = request("/generate")
    if await admission.admit(req, GENERATE, body) is not None:
        return None
    avoid, held_back = await admission.attempt(req)
    assert held_back is None
    topo = admission.topology
    node = await relay._Tries(topo, admission.metrics, 30.0, affinity).next(avoid)
    assert node is not None
    node.inflight.add(_Stream(topo.clock()))
    return node


async def placed_until_refused(
    admission: Admission, body: dict[str, Any], affinity: Affinity | None = None
) -> list[tuple[str, float]]:
    """Requests sent one after another until one is refused (at most 200): where each
    admitted one went, with that node's expected wait as it found it."""
    placed: list[tuple[str, float]] = []
    for _ in range(200):
        waits = {n.name: admission.wait.estimate(n) for n in admission.topology.nodes.values()}
        node = await admit_and_route(admission, body, affinity)
        if node is None:
            break
        before = waits[node.name]
        assert before is not None
        placed.append((node.name, round(before.wait, 1)))
    return placed


async def test_a_pool_sends_an_admitted_request_to_a_node_within_the_bound(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool admits a request while its least-wait node is within the bound, and
    routes by prefix and load: the prompt's home may be the node past the bound. Sent
    there, the request waits past the bound, and the node with room looks as it did,
    so the next is admitted too (on the code before: 10 of 14 to the home, the last
    to wait 39 s against a 10 s bound). A first attempt goes to a node within it."""
    clock = FakeClock()
    monkeypatch.setattr(gate.time, "monotonic", clock)
    admission = pool_worker(tmp_path, clock)
    topo = admission.topology
    # Both engines run 8 streams that began together 2.1 s ago; this worker holds 6 of
    # a's and 2 of b's (the other worker the rest), and knows when each began.
    began = clock()
    for name, mine in (("a", 6), ("b", 2)):
        report(topo, name, 8, 0)
        topo.nodes[name].inflight.update(_Stream(began, began) for _ in range(mine))
    clock.advance(2.1)
    prompt = "A system prompt every request shares. " * 8  # a prefix block of 256 chars
    body = {"text": prompt + "Tell a very long story.", "sampling_params": {"max_new_tokens": 2000}}
    affinity = affinity_of(GENERATE, body, topo.s.affinity_block_chars, topo.s.affinity_max_chars)
    topo.sent(topo.nodes["a"], affinity)  # the prompt's prefix is cached on a
    placed = await placed_until_refused(admission, body, affinity)
    # Each node takes what fits within the bound as this worker counts (its share
    # times the two workers; b's other requests taken as spread over a generation).
    assert all(wait <= BOUND for _, wait in placed), placed
    assert Counter(name for name, _ in placed) == {"a": 2, "b": 4}, placed


async def test_a_pool_node_whose_queue_shows_late_is_not_filled_past_the_bound(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool sends new requests to a node whose engine reports no queue while another
    reports one (topology.py `_pool_order`), and the agents' reports come at their own
    times: the one that has not shown its queue yet takes every request, each admitted
    for the other node's room. It fits what the CPU stack's pool did under a CPU
    burner (2026-12-07, no relay log kept): 70 long streams admitted in 0.6 s where 16
    fit, refused again only after, the last waiting 157 s against the 10 s bound (and
    stop 38's CI: 85 admitted). Here, on the code before, all 200 requests sent were
    admitted, every one to b, the last to wait 556 s. Once past the bound b is
    avoided: the node with room takes the requests, its wait rises, and the rest are
    refused."""
    clock = FakeClock()
    monkeypatch.setattr(gate.time, "monotonic", clock)
    admission = pool_worker(tmp_path, clock)
    topo = admission.topology
    began = clock()
    for name in ("a", "b"):  # 8 running on each, 4 of them this worker's
        topo.nodes[name].inflight.update(_Stream(began, began) for _ in range(4))
    clock.advance(2.1)
    report(topo, "a", 8, 2)  # a's agent has reported the first requests queued there
    report(topo, "b", 8, 0)  # b's report is older
    body = {"text": "Tell a very long story.", "sampling_params": {"max_new_tokens": 2000}}
    placed = await placed_until_refused(admission, body)
    assert all(wait <= BOUND for _, wait in placed), placed
    assert Counter(name for name, _ in placed) == {"a": 4, "b": 4}, placed


def test_short_requests_admitted_behind_a_batch_do_not_shorten_it(tmp_path: Any) -> None:
    """Each request in a slot is timed by its own budget. Timed by the mean budget of
    this worker's requests, the 2,000-token batch in the slots looked quicker with
    every 16-token request admitted behind it, which let the next one in: on the
    CPU stack after a failover 16 side-load requests were admitted within 2.3 s and
    waited 17-19 s for their first token against the 10 s bound."""
    clock = FakeClock()
    est = WaitEstimator(topology(tmp_path, clock=clock), BOUND)
    est.slots["a"] = 8
    measured(est, "a", 11.0, budget=2000)  # 2,000-token streams: 11 s each
    node = report(est.topology, "a", 8, 0)
    batch = [_Stream(clock() - 0.5, began=clock() - 0.5, budget=2000) for _ in range(8)]
    node.inflight.update(batch)
    light: list[_Stream] = []
    est.queue_budget = lambda: (2000 * len(batch) + 16 * len(light)) / (len(batch) + len(light))
    waits = []
    for _ in range(12):  # short requests queued behind the batch, nothing back yet
        e = est.estimate(node)
        assert e is not None
        waits.append(round(e.wait, 2))
        assert est.refuses(e, complete=True), waits
        light.append(_Stream(clock(), budget=16))
        node.inflight.add(light[-1])
    # The batch leaves its slots 10.5 s from now: no one behind it gets one sooner,
    # and each one admitted behind it only adds to the wait.
    assert waits[0] == 10.5 and waits == sorted(waits), waits


def test_a_moved_streams_last_segment_is_a_service_time_for_what_it_had_left(
    admission: Admission,
) -> None:
    """A failover's survivor finishes the moved streams first: their decode there, for
    the tokens each had left, is what the machine does now (slower under load than
    the warm-up that measured it: on the CPU stack 11.4 s per 2,000 tokens in the
    warm-up, 20 s under the burst)."""
    measured(admission.wait, "a", 11.0, budget=2000)
    req = request("/generate")
    req[gate._KEY] = gate.Ticket(GENERATE, {"text": "hi"})
    req[gate._KEY].budget = 2000
    assert admission.budget(req) == 2000
    assert admission.budget(req, left=1500) == 1500  # a continuation's
    before = admission.wait.service.per_token("a")
    for _ in range(20):
        admission.segment_served(req, "a", 15.0, 1500)  # 10 ms a token
    after = admission.wait.service.per_token("a")
    assert before == pytest.approx(0.0055) and after is not None and after > 0.0095
    # Not an admitted generation: no budget, no sample.
    other = request("/v1/models")
    assert admission.budget(other) is None
    admission.segment_served(other, "a", 1000.0, None)
    assert admission.wait.service.per_token("a") == after


def test_streams_decoding_past_the_measured_time_slow_the_estimate_at_once(
    tmp_path: Any,
) -> None:
    """The warm-up measured a quiet machine; the burst slows it. A stream still
    decoding after E s with a budget of B tokens takes at least E / B s a token, and so
    does every request behind it: the queue is timed at that pace before any request
    completes to say so (the CPU stack's pair: 11.4 s measured, 19-20 s under the
    burst, side-load requests let in to wait 17-19 s against the 10 s bound)."""
    clock = FakeClock()
    est = WaitEstimator(topology(tmp_path, clock=clock), BOUND)
    est.slots["a"] = 8
    measured(est, "a", 11.0, budget=2000)
    node = report(est.topology, "a", 8, 8)
    node.inflight.update(_Stream(clock(), began=clock(), budget=2000) for _ in range(8))
    node.inflight.update(_Stream(clock(), budget=2000) for _ in range(8))  # queued
    e = est.estimate(node)
    assert e is not None and e.wait == pytest.approx(22.0)  # two batches of 11 s
    clock.advance(15.0)  # running past its 11 s: 7.5 ms a token at least, not 5.5
    e = est.estimate(node)
    # The batch leaves any moment; the 8 queued, then this one, at 15 s each (the
    # formula's 9 x 15 / 8; at the measured 11 s it was 12.4 s, under the bound).
    assert e is not None and e.service == pytest.approx(15.0)
    assert e.wait == pytest.approx(9 * 15.0 / 8) and est.refuses(e, complete=True)
    clock.advance(5.0)
    e = est.estimate(node)
    assert e is not None and e.wait == pytest.approx(9 * 20.0 / 8)
    # What it measured stays as measured; the pace is read from the streams each time.
    assert est.service.of("a") == pytest.approx(11.0)
    node.inflight.clear()
    report(est.topology, "a", 0, 0)
    assert est.estimate(node).service == pytest.approx(11.0)  # type: ignore[union-attr]
