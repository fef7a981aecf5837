"""Admission by expected wait: a request that would queue past its client's patience
is told at once (429 + `Retry-After`), instead of waiting for a slot it will not see.

A node that lost its partner may have to carry more than it can: a saturated engine
is healthy (the agent judges it so, ha_agent/node/engine/monitor.py), so nothing
fails over, and every new request joins the scheduler's FIFO queue. The queue bound
of shedding.py counts requests, not seconds: 200 queued one-line answers are a short
wait, 200 queued 2,000-token generations a very long one. This module estimates the
seconds.

For a new request on node n:

    outstanding O = max(running + queued as n's agent reports them,
                        (this relay worker's requests in flight on n, plus its
                        requests between two attempts) x the relay workers)
    capacity    C = the engine's running slots; once it has reported a queue with
                    fewer running than its slots for 2 s, the running count (the KV
                    pool is full: SGLang admits a request only when its tokens fit,
                    srt/managers/schedule_policy.py `PrefillAdder`)
    service     T = measured seconds per request (below)
    expected wait = 0 while O < C, else (O - C + 1) * T / C

Once every slot is busy, slots free up at C / T per second on average (one request
leaves every T / C s), and the new request needs the O - C requests ahead of it and
itself to find one. That average assumes the running requests spread over their
service time; a burst that took the slots together leaves them together, and the
request behind it waits for the whole batch (up to T longer). So the wait is also
taken from when this worker's requests on the node took their slots (a stream's
first event back, `Abandonable.began`; a stream with nothing back yet, no sooner
than now; any other request, when it was sent, `Abandonable.since`; its requests
between two attempts as sent now, together): the slots filled in FIFO order, each
held from its request's start for T scaled to that request's own budget
(`Abandonable.budget`; a moved stream's continuation, what it had left); the
estimate is the larger of the two (`_by_starts`). Both take T no quicker than the
streams decoding on the node show: one that began E s ago with a budget of B tokens
and has not ended takes at least E / B s a token, and so do the others in its batch
(`_pace`). Where the inputs come from:

- running / queued: SGLang's `sglang:num_running_reqs` / `sglang:num_queue_reqs`, as
  the agent scrapes them (`AgentStatus.engine`), polled anyway by the topology: the
  same numbers on every relay worker, up to ~1.5 s old (SGLang publishes them every
  `--decode-log-interval` decode iterations). A burst arrives faster than that, so
  the worker's own count of requests in flight on the node (exact, immediate), times
  the relay workers (Nginx spreads requests over them evenly; each worker sees only
  its share), is a floor: seen on the CPU stack with 2 workers, each counting only
  itself let in twice the burst the bound allowed. So are the worker's requests between two
  attempts: in a failover the requests of the lost node are re-sent to the survivor,
  some only after the relay has learnt how the node died (quarantine.py, up to
  seconds), and until then the survivor looks idle; each candidate counts them.
- running slots: SGLang's `/server_info`, `internal_states[*]`
  `.effective_max_running_requests_per_dp` (`srt/managers/scheduler.py`
  `get_internal_state`: the scheduler's own `max_running_requests` after its memory
  sizing; one entry per data-parallel rank, summed), else the top-level
  `max_running_requests` (the `--max-running-requests` flag, None when unset).
  Asked of every node every minute by `learn_slots`, never on a request's path.
- service time: an average over this worker's completed requests on the node, from
  what the relay sees (`ServiceTimes`): a stream's time from its first event to its
  end (its decode; the prefill before the first event is left out, so T errs low and
  the relay sheds later, not sooner; a moved stream's last segment, for the tokens
  it had left: the survivor of a failover finishes those first, at the speed of the
  machine under load, which the warm-up may have measured far quicker), a
  non-streaming request's whole attempt when the node it went to had a slot free at
  its admission (no queue in it; in a pool, whichever node the routing picked, not
  only the least-wait one). Until a node has its own
  samples it takes the average over all nodes (a standby promoted in a failover
  inherits what its partner measured). With no measurement at all nothing is shed:
  no refusal on a guess. The average is scaled by the mean completion budget
  (`max_tokens` and its kin, the endpoint table's budget keys) of the worker's
  outstanding requests over that of the requests measured: a mean over completions
  is dominated by short requests, which finish often, while the queue may hold long
  ones (a burst of 2,000-token generations behind a 16-token side load).

The pair asks this of its one serving node; a pool of the least-wait node among the
serving ones (`candidates`): a request is shed only when every candidate is past the
bound, and never while one of them cannot be estimated. A request admitted so goes
first to a candidate within the bound (`Survey.past`, gate.py `Admission.attempt`): a
pool routes by prefix, load and the queues the agents report, so a prompt's home past
the bound, or a node whose agent has not reported its queue yet, would take request
after request admitted for another node's room, that node's estimate unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ha_agent.gateway.upstream.topology import Abandonable, NodeView, Topology
from ha_agent.gateway.upstream.transport import Transport

log = logging.getLogger(__name__)

# Samples averaged plainly before the moving average takes over (a warm start), and
# the moving average's weight: about the last 20 completions count.
WARM_SAMPLES = 10
ALPHA = 0.1
# A node's own average is used once it has this many samples (else the cluster's).
MIN_SAMPLES = 3
# A queue while running < slots means a full KV pool once it lasted this long, s.
KV_LIMIT_AFTER = 2.0
# The OpenAI Python SDK waits what Retry-After says up to 60 s (1.x; 120 s in 3.63)
# and backs off by itself or gives up beyond (`_calculate_retry_timeout`).
RETRY_AFTER_MAX = 60


class _Average:
    """A mean of the first samples, then an exponential moving average."""

    __slots__ = ("count", "value")

    def __init__(self) -> None:
        self.count = 0
        self.value = 0.0

    def add(self, sample: float) -> None:
        self.count += 1
        weight = max(1.0 / self.count, ALPHA) if self.count <= WARM_SAMPLES else ALPHA
        self.value += weight * (sample - self.value)


class ServiceTimes:
    """Measured seconds per request, per node and over all nodes, with the mean
    completion budget (requested tokens) of the requests measured."""

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[_Average, _Average]] = {}
        self._all = (_Average(), _Average())

    def add(self, node: str, seconds: float, budget: float) -> None:
        if not (seconds >= 0 and math.isfinite(seconds) and budget > 0):
            return
        for service, budgets in (self._nodes.setdefault(node, (_Average(), _Average())), self._all):
            service.add(seconds)
            budgets.add(budget)

    def _pick(self, node: str) -> tuple[_Average, _Average] | None:
        own = self._nodes.get(node)
        if own is not None and own[0].count >= MIN_SAMPLES:
            return own
        if self._all[0].count >= MIN_SAMPLES:
            return self._all
        return None

    def of(self, node: str) -> float | None:
        """The node's average, or the cluster's while it has too few samples of its
        own; None when nothing was measured."""
        picked = self._pick(node)
        return picked[0].value if picked is not None else None

    def per_token(self, node: str) -> float | None:
        """Seconds per budgeted token: `of` over `budget_of` (None: nothing measured)."""
        picked = self._pick(node)
        if picked is None or picked[1].value <= 0:
            return None
        return picked[0].value / picked[1].value

    def budget_of(self, node: str) -> float | None:
        """The mean budget of the requests `of` averages over."""
        picked = self._pick(node)
        return picked[1].value if picked is not None else None

    def forget(self, keep: set[str]) -> None:
        """Drop nodes no longer in the view (the labels stay bounded)."""
        for name in list(self._nodes):
            if name not in keep:
                del self._nodes[name]


@dataclass(frozen=True)
class Queue:
    """Where a new request would stand on a node."""

    node: str
    outstanding: int  # requests on the node before this one
    slots: int | None  # running slots in effect; None: unknown
    free: bool  # a slot is free for it

    @property
    def ahead(self) -> int:
        """Requests that must leave before it gets a slot, itself included."""
        if self.free or self.slots is None:
            return 0
        return self.outstanding - self.slots + 1


@dataclass(frozen=True)
class Estimate:
    queue: Queue
    service: float  # seconds per request
    wait: float  # expected seconds before a slot

    @property
    def node(self) -> str:
        return self.queue.node


@dataclass(frozen=True)
class Survey:
    """The candidates as a new request finds them."""

    best: Estimate | None  # the least-wait one
    complete: bool  # every candidate was estimated
    # Those with a slot free: a pool routes by load and prefix (topology.py
    # `_pool_order`), not by this estimate, so the request may land on any of them,
    # and its time there is a clean service time on whichever it is.
    free: frozenset[str]
    # Those whose own wait is past the bound: a request admitted for another
    # candidate's room goes there first (Admission.attempt), not where it would wait
    # past the bound while the estimate of the node with room stays as it was.
    past: frozenset[str] = frozenset()


def _began(item: Abandonable, now: float) -> float | None:
    """When `item` took its slot, as far as this worker can tell: a stream's first
    event back; a stream with nothing back yet is queued (or in its prefill) and takes
    a slot no sooner than now; anything else, when it was sent. (A stream re-sent to a
    survivor that already holds a backlog may wait there for minutes: counted from
    when it was sent, it would look about to leave when it has just begun.)"""
    if item.began is not None:
        return item.began
    if item.since is None:
        return None
    return max(item.since, now) if item.stream else item.since


def parse_slots(info: Any) -> int | None:
    """The running slots an SGLang `/server_info` answer reports (see the module
    docstring), or None."""
    if not isinstance(info, dict):
        return None
    states = info.get("internal_states")
    if isinstance(states, list) and states:
        per_rank = [
            s.get("effective_max_running_requests_per_dp") if isinstance(s, dict) else None
            for s in states
        ]
        if all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in per_rank):
            return sum(per_rank)  # type: ignore[arg-type]
    flag = info.get("max_running_requests")
    if isinstance(flag, int) and not isinstance(flag, bool) and flag > 0:
        return flag
    return None


def first_serving(topology: Topology) -> list[NodeView]:
    """The pair's candidate: the node a new request is sent to first."""
    now = topology.clock()
    for node in topology.routing_order():
        if node.can_serve(now):
            return [node]
    return []


def all_serving(topology: Topology) -> list[NodeView]:
    """A pool's candidates: every node that can serve."""
    now = topology.clock()
    return [n for n in topology.nodes.values() if n.can_serve(now)]


class WaitEstimator:
    def __init__(
        self,
        topology: Topology,
        bound: float,
        candidates: Callable[[Topology], Sequence[NodeView]] = first_serving,
    ) -> None:
        self.topology = topology
        self.bound = bound  # 0: never shed
        self.candidates = candidates
        self.service = ServiceTimes()
        self.slots: dict[str, int] = {}  # learnt from each engine's /server_info
        self.rng = random.Random()
        # This worker's admitted requests on no node at the moment (re-sent after a
        # failure): they land on a serving node next, so each candidate counts them.
        self.in_transit: Callable[[], int] = lambda: 0
        # Relay workers sharing the requests (Nginx spreads them over the workers'
        # sockets): this worker's count times this is the gateway's, to a first guess.
        self.workers = 1
        # The mean completion budget of this worker's outstanding requests (None: none).
        self.queue_budget: Callable[[], float | None] = lambda: None
        self._short_since: dict[str, float] = {}  # since when a queue has waited on free slots

    def queue(self, node: NodeView) -> Queue | None:
        """Where a new request would stand on `node`; None without an agent's report."""
        status = node.status
        if status is None:
            return None
        running, queued = int(status.engine.running), int(status.engine.queued)
        own = len(node.inflight) + self.in_transit()
        outstanding = max(running + queued, own * self.workers)
        slots = self.slots.get(node.name)
        if queued > 0 and running > 0 and (slots is None or running < slots):
            # A queue with slots unused: the KV pool is the limit, once it has lasted
            # (a burst is admitted over a few prefill batches; mid-ramp, what runs
            # is not yet what can run).
            now = self.topology.clock()
            since = self._short_since.setdefault(node.name, now)
            if slots is None or now - since >= KV_LIMIT_AFTER:
                slots = running
        else:
            self._short_since.pop(node.name, None)
        if slots is None:
            # Capacity unknown: no queue reported means room, as far as anyone knows.
            return Queue(node.name, outstanding, None, free=queued == 0)
        return Queue(node.name, outstanding, slots, free=outstanding < slots)

    def estimate(self, node: NodeView) -> Estimate | None:
        """The expected wait of a new request on `node`, or None when it cannot be
        estimated (no report, capacity or service time unknown)."""
        queue = self.queue(node)
        if queue is None:
            return None
        if queue.free:
            return Estimate(queue, self.service_time(node.name) or 0.0, 0.0)
        service = self.service_time(node.name)
        measured = self.service.per_token(node.name)  # None exactly when service is
        if service is None or measured is None or queue.slots is None:
            return None
        rate = self._pace(node, measured)
        if measured > 0:
            service *= rate / measured
        spread = queue.ahead * service / queue.slots
        wait = max(spread, self._by_starts(node, queue, service, rate))
        return Estimate(queue, service, wait)

    def _pace(self, node: NodeView, measured: float) -> float:
        """Seconds per budgeted token on `node`: `measured`, raised to what its
        streams in decode show. A stream that began decoding E s ago with a budget of
        B tokens and has not ended takes at least E / B s a token, and a continuous
        batch decodes one token of every running request a step, so the others take
        as long: a machine slowed by the very load being estimated shows here at once,
        before any request completes to say so (on the CPU stack's pair the warm-up
        measured 11.4 s per 2,000-token stream, the burst after the kill took 19-20
        s). A stream held back by a slow client reads the same: the estimate errs long
        then (sheds sooner), never short."""
        if measured <= 0:
            return measured
        now = self.topology.clock()
        rate = measured
        for item in node.inflight:
            if item.began is not None and item.budget:
                rate = max(rate, (now - item.began) / item.budget)
        return rate

    def _by_starts(self, node: NodeView, queue: Queue, service: float, rate: float) -> float:
        """The wait that the start times of this worker's requests on `node` give: the
        slots taken in FIFO order, each from when its request started for `rate`
        seconds a token of its budget (`service` seconds without one). Requests sent
        together leave together: behind a batch that just started, the first slot
        frees only when the batch ends, not after T / C.
        Requests of unknown start (the engine reports more than this worker knows of)
        are taken as spread evenly over the last `service` seconds, the formula's own
        assumption. 0 when no start is known and none is between attempts (the
        formula alone then)."""
        if queue.slots is None or queue.slots <= 0:
            return 0.0
        now = self.topology.clock()

        # Each request for its own budget where it has one: timed by the mean budget,
        # a 2,000-token generation in a slot looked quicker with every 16-token
        # request admitted behind it, and let more in (the CPU stack's pair after a
        # failover: 16 side-load requests admitted within 2.3 s, first token 17-19 s).
        def held(item: Abandonable) -> float:
            return rate * item.budget if item.budget else service

        known = sorted((t, held(a)) for a in node.inflight if (t := _began(a, now)) is not None)
        # Requests between attempts are sent next, together: they start no sooner than
        # now (a failover re-sends the lost node's requests to an idle survivor).
        transit = self.in_transit()
        if not known and not transit:
            return 0.0
        starts = known + [(now, service)] * transit
        # Each of this worker's requests stands for one on every relay worker.
        starts = [s for s in starts for _ in range(self.workers)]
        unknown = queue.outstanding - len(starts)
        if unknown > 0:
            starts += [(now - service * (i + 0.5) / unknown, service) for i in range(unknown)]
            starts.sort()
        slots = [float("-inf")] * queue.slots  # when each slot frees (a heap)
        for i, (sent, takes) in enumerate(starts):
            start = max(sent, heapq.heappop(slots))
            if start - now > self.bound > 0:
                # Past the bound already: the rest go at the formula's pace (the
                # refusal's number, not its decision).
                return start - now + (len(starts) - i) * service / queue.slots
            # Still there, so not done before now, whatever the average says.
            heapq.heappush(slots, max(start + takes, now))
        return max(slots[0] - now, 0.0)

    def service_time(self, node: str) -> float | None:
        """Seconds per request for the requests outstanding now: the measured average,
        scaled by how the mean budget of this worker's outstanding requests compares
        with that of the requests measured (a queue of 2,000-token generations behind
        a stream of 16-token answers is not as quick as those answers were)."""
        measured = self.service.of(node)
        if measured is None:
            return None
        now, then = self.queue_budget(), self.service.budget_of(node)
        if now is None or not then:
            return measured
        return measured * now / then

    def least(self) -> tuple[Estimate | None, bool]:
        """The least-wait candidate's estimate, and whether every candidate could be
        estimated (if not, the estimate says nothing about the others)."""
        survey = self.survey()
        return survey.best, survey.complete

    def survey(self) -> Survey:
        """`least()`'s answer, with the candidates that have a slot free now."""
        best: Estimate | None = None
        complete = True
        free: set[str] = set()
        past: set[str] = set()
        for node in self.candidates(self.topology):
            est = self.estimate(node)
            if est is None:
                complete = False
                continue
            if est.queue.free:
                free.add(est.node)
            if self.bound > 0 and est.wait > self.bound:
                past.add(est.node)
            if best is None or est.wait < best.wait:
                best = est
        return Survey(best, complete, frozenset(free), frozenset(past))

    def refuses(self, best: Estimate | None, complete: bool) -> bool:
        """Is a new request refused, given `least()`'s answer? Only when every
        candidate was estimated and even the least wait is past the bound."""
        return self.bound > 0 and complete and best is not None and best.wait > self.bound

    def retry_after(self, est: Estimate, floor: int) -> int:
        """Seconds until the wait is back under the bound if nothing new arrived (it
        falls by a second per second: one request leaves every T / C s), at least
        `floor`, at most what the OpenAI SDK honours; spread by up to half of it (at
        least a second), so that the clients refused in one burst do not all come back
        in the same second (the SDKs wait exactly what the header says)."""
        base = max(floor, min(RETRY_AFTER_MAX, math.ceil(est.wait - self.bound)))
        return min(RETRY_AFTER_MAX, base + self.rng.randint(0, max(1, base // 2)))

    def retry_after_ms(self, seconds: int) -> int:
        """`retry-after-ms` for a refusal told `Retry-After: seconds`: the same
        delay plus up to a second, in milliseconds. The OpenAI Python SDK prefers it
        to `Retry-After` (`_parse_retry_after_header`, read in 3.63): the clients of a
        burst told the same whole second would come back in the same instant and
        queue their next refusals behind each other; spread within the second they
        arrive one by one."""
        return min(seconds * 1000 + self.rng.randrange(1000), RETRY_AFTER_MAX * 1000)

    def served(self, node: str, seconds: float, budget: float) -> None:
        self.service.add(node, seconds, budget)

    def forget_gone(self) -> None:
        keep = set(self.topology.nodes)
        self.service.forget(keep)
        for name in list(self.slots):
            if name not in keep:
                del self.slots[name]


async def ask_slots(
    estimator: WaitEstimator, node: NodeView, transport: Transport, timeout: float = 5.0
) -> int | None:
    """Ask an engine (`GET /server_info`) for its running slots and keep the answer."""
    try:
        async with transport.session.get(
            node.engine_url + "/server_info", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status != 200:
                return None
            slots = parse_slots(await resp.json())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    if slots is not None and estimator.slots.get(node.name) != slots:
        estimator.slots[node.name] = slots
        log.info("%s has %d running slots (its /server_info)", node.name, slots)
    return slots


async def learn_slots(estimator: WaitEstimator, transport: Transport, stop: asyncio.Event) -> None:
    """Keep every node's running slots as its engine reports them, every minute
    (every 2 s while one is unknown: a node starting, or down). The standby's too:
    it is the node a request goes to the moment the primary fails."""
    while not stop.is_set():
        nodes = list(estimator.topology.nodes.values())
        await asyncio.gather(*(ask_slots(estimator, n, transport) for n in nodes))
        estimator.forget_gone()
        unknown = any(n.name not in estimator.slots for n in nodes)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=2.0 if unknown else 60.0)


class WaitCollector(Collector):
    """The estimate per node, as this worker sees it when scraped (bounded labels:
    the nodes in the view)."""

    def __init__(self, estimator: WaitEstimator) -> None:
        self.e = estimator

    def collect(self) -> Iterator[GaugeMetricFamily]:
        wait = GaugeMetricFamily(
            "sglang_ha_relay_expected_wait_seconds",
            "Expected queue wait of a new request on the node (absent: cannot be"
            " estimated yet); requests are refused past HA_SHED_WAIT_BOUND.",
            labels=["node"],
        )
        service = GaugeMetricFamily(
            "sglang_ha_relay_service_time_seconds",
            "Seconds per request on the node as the wait estimate uses it: the moving"
            " average measured, scaled to the budgets of the requests outstanding.",
            labels=["node"],
        )
        for node in list(self.e.topology.nodes.values()):
            est = self.e.estimate(node)
            if est is not None:
                wait.add_metric([node.name], est.wait)
            measured = self.e.service_time(node.name)
            if measured is not None:
                service.add_metric([node.name], measured)
        yield wait
        yield service
