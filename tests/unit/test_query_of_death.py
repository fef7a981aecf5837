"""A query of death with real simulator processes, agents, Redis and the relay.

Both engines crash on a marked prompt (the simulator's crash_marker knob), logging
"Scheduler hit an exception" as SGLang's scheduler does; the agents watch their
engine's process and log as in sidecar mode, and a background task restarts a dead
engine as supervisord would. Under load from clients that never retry, one poisonous
request: it alone is quarantined (503 saying why, QUERY_QUARANTINED, the metric), every
other request is served, and the two engines are never down at once. Two unrelated
faults (the standby hung, then the primary killed) quarantine nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from ha_agent.gateway.admission.quarantine import EXCEPTION_GRACE
from tests.support.cluster import LocalCluster, collect_stream, local_cluster
from tests.support.processes import RedisProcess
from tests.support.sim import ExitedWhileStarting

MARKER = "QOD-5d1e"


@pytest.fixture
async def cluster(redis_proc: RedisProcess) -> AsyncIterator[LocalCluster]:
    faults = {"SIM_FAULTS": json.dumps({"crash_marker": MARKER})}
    async with local_cluster(redis_proc, sim_env=faults, watch_process=True) as c:
        await c.wait_ready()
        yield c


def dead(cluster: LocalCluster, name: str) -> bool:
    sim = cluster.nodes[name].sim
    return sim is None or sim.proc is None or sim.proc.poll() is not None


def restart_if_dead(cluster: LocalCluster, name: str) -> int:
    """What supervisord does for a dead engine: start it again, and again if it dies
    while starting (images/node/supervisord.conf: startretries=1000; bounded here so
    a test cannot spin). How many times it was started."""
    node = cluster.nodes[name]
    if not dead(cluster, name):
        return 0
    if node.sim is not None:  # kill_engine() has already reaped its own kill
        node._sim_cm.__exit__(None, None, None)
    node.sim = None
    starts = 0
    while True:
        starts += 1
        try:
            cluster.start_engine(name)
        except ExitedWhileStarting:
            if starts >= 10:
                raise
            continue
        return starts


@dataclass
class Watch:
    """Restarts dead engines (supervisord) and notes whether both were ever down."""

    cluster: LocalCluster
    restarts: dict[str, int] = field(default_factory=dict)
    both_down: int = 0  # samples with no engine process alive

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            names = list(self.cluster.nodes)
            if all(dead(self.cluster, n) for n in names):
                self.both_down += 1
            for name in names:
                if starts := await asyncio.to_thread(restart_if_dead, self.cluster, name):
                    self.restarts[name] = self.restarts.get(name, 0) + starts
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


@contextlib.asynccontextmanager
async def supervised(cluster: LocalCluster) -> AsyncIterator[Watch]:
    watch, stop = Watch(cluster), asyncio.Event()
    task = asyncio.ensure_future(watch.run(stop))
    try:
        yield watch
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def everyone_else(
    http: httpx.AsyncClient, url: str, client: int, stop: asyncio.Event, outcomes: list[str]
) -> None:
    """A client that never retries: streams (even clients) or waits for whole answers."""
    n = 0
    while not stop.is_set():
        n += 1  # distinct prompts, as distinct users send
        body = {"text": f"hello {client}.{n}", "sampling_params": {"max_new_tokens": 40}}
        try:
            if client % 2 == 0:
                events = await collect_stream(http, f"{url}/generate", {**body, "stream": True})
                bad = [e for e in events if '"error"' in e]
                outcomes.append("ok" if events[-1] == "[DONE]" and not bad else f"stream {bad}")
            else:
                r = await http.post(f"{url}/generate", json=body)
                outcomes.append("ok" if r.status_code == 200 else f"{r.status_code} {r.text}")
        except (httpx.HTTPError, AssertionError) as exc:
            outcomes.append(f"error {exc!r}")


async def test_a_query_of_death_under_load_costs_only_itself(cluster: LocalCluster) -> None:
    assert cluster.relay is not None
    url = cluster.relay_url
    deadly = {"text": f"please {MARKER} now", "sampling_params": {"max_new_tokens": 4}}
    outcomes: list[str] = []
    async with supervised(cluster) as watch, httpx.AsyncClient(timeout=60) as http:
        stop = asyncio.Event()
        clients = [
            asyncio.ensure_future(everyone_else(http, url, c, stop, outcomes)) for c in range(4)
        ]
        await cluster.wait_for(lambda: len(outcomes) >= 4, 30, "the load under way")
        sent = time.monotonic()
        r = await http.post(f"{url}/generate", json=deadly)
        took = time.monotonic() - sent
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "quarantined" in message and "query of death" in message
        await cluster.wait_ready(timeout=30)
        # The same request again: refused at once, no engine touched.
        started = time.monotonic()
        again = await http.post(f"{url}/generate", json=deadly)
        assert again.status_code == 503 and "quarantined" in again.json()["error"]["message"]
        assert time.monotonic() - started < 1.0
    print(
        f"query of death answered in {took:.1f}s; others: {len(outcomes)} requests,"
        f" {outcomes.count('ok')} ok; restarts {watch.restarts}"
    )
    assert [o for o in outcomes if o != "ok"] == [], "no one else failed"
    assert len(outcomes) >= 8, outcomes
    assert watch.restarts == {n: 1 for n in cluster.nodes}, "each engine crashed once"
    assert watch.both_down == 0, "never both engines down"
    log = cluster.ha_log("relay")
    assert log.count("QUERY_QUARANTINED") == 1, log
    assert cluster.relay.metrics.quarantined._value.get() == 1


async def test_the_standby_hung_then_the_primary_killed_quarantines_nothing(
    cluster: LocalCluster,
) -> None:
    assert cluster.relay is not None
    url = cluster.relay_url
    primary = await cluster.wait_ready()
    standby = cluster.other(primary)
    outcomes: list[str] = []
    async with httpx.AsyncClient(timeout=60) as http:
        stop = asyncio.Event()
        clients = [
            asyncio.ensure_future(everyone_else(http, url, c, stop, outcomes)) for c in range(4)
        ]
        await cluster.wait_for(lambda: len(outcomes) >= 4, 30, "the load under way")
        cluster.freeze_engine(standby)
        await asyncio.sleep(3.0)  # as the user did: the primary killed 3 s later
        async with supervised(cluster):
            cluster.kill_engine(primary)
            await asyncio.sleep(3.0)
            cluster.thaw_engine(standby)
            await cluster.wait_ready(timeout=30)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
    print(f"{len(outcomes)} requests: {sum(o == 'ok' for o in outcomes)} ok")
    assert not [o for o in outcomes if "quarantined" in o], outcomes
    assert "QUERY_QUARANTINED" not in cluster.ha_log("relay")
    assert cluster.relay.metrics.quarantined._value.get() == 0


async def test_a_plain_kill_re_sends_whole_answers_without_waiting_out_the_grace(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Whole-answer requests (suspects until the relay knows how the node died) on an
    engine killed with SIGKILL: re-sent once the agent has read the dead run's log to its
    end (OUTPUT_SETTLE), before the relay's grace for an agent that cannot say so would
    have run out, and every one answered."""
    assert cluster.relay is not None
    caplog.set_level(logging.INFO, logger="ha_agent.gateway")
    primary = await cluster.wait_ready()
    node = cluster.relay.topology.nodes[primary]
    body = {"text": "a long answer", "sampling_params": {"max_new_tokens": 200}}
    async with httpx.AsyncClient(timeout=60) as http:
        answers = [
            asyncio.ensure_future(
                http.post(f"{cluster.relay_url}/generate", json={**body, "text": f"answer {i}"})
            )
            for i in range(4)
        ]
        await cluster.wait_for(lambda: len(node.inflight) >= 4, 10, "the requests on the primary")
        # Not restarted while the requests wait (supervisord holds a restarted engine in
        # STARTING for startsecs=1 anyway); a process the sidecar sees gone and back
        # between two looks gets the grace.
        killed = time.time()
        cluster.kill_engine(primary)
        statuses = [r.status_code for r in await asyncio.wait_for(asyncio.gather(*answers), 60)]

    def at(text: str) -> list[float]:
        return [r.created - killed for r in caplog.records if text in r.getMessage()]

    broke, resent = at(f"attempt on {primary} failed"), at("failed holding a request")
    print(
        f"broken {[round(t, 2) for t in broke]} s and re-sent {[round(t, 2) for t in resent]} s"
        f" after the kill; answers {statuses}"
    )
    assert statuses == [200] * 4
    assert len(resent) == 4, caplog.text[-2000:]
    # The verdict's own wait, from the first broken connection to the last re-send.
    assert max(resent) - min(broke) < EXCEPTION_GRACE - 0.1, (broke, resent)
