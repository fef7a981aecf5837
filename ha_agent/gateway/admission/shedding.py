"""Load shedding at admission: a saturated primary answers 429, not a timeout.

Saturation is not a fault (the agent judges a busy engine healthy, see
ha_agent/node/engine/monitor.py): nothing fails over, so a request sent to a primary
with a long queue simply waits, possibly past the client's timeout, and makes the
queue longer for everyone behind it. Past a bound the relay answers at once with
429 and `Retry-After` (the OpenAI SDKs retry a 429 after that delay by default).

The signal is the primary's queue as its agent reports it (`AgentStatus.engine.queued`,
SGLang's `sglang:num_queue_reqs`), which the topology already polls every
`poll_interval`: no extra request per admission, and the same number on every relay
worker. It lags by at most the agent's probe period plus one poll (about 1.5 s by
default), so a burst can overshoot the bound by what arrives in that time; that is
still a bounded queue. SGLang's own `--max-queued-requests` (off by default) would
answer 503 from the scheduler *after* tokenizing; the relay's bound is cheaper and
leaves the engine's answer as a last line.
"""

from __future__ import annotations

from dataclasses import dataclass

from ha_agent.gateway.upstream.topology import Topology


@dataclass(frozen=True)
class Shed:
    status: int
    message: str
    retry_after: int

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Shedder:
    def __init__(
        self, topology: Topology, queue_bound: int, retry_after: int, pool: bool = False
    ) -> None:
        self.topology = topology
        self.queue_bound = queue_bound  # 0: never shed
        self.retry_after = retry_after
        # A pool routes around one saturated node: only all of them saturated is overload.
        self.pool = pool

    def check(self) -> Shed | None:
        """A refusal when the primary's queue is past the bound, else None."""
        if self.queue_bound <= 0:
            return None
        if self.pool:
            return self._check_pool()
        node = self.topology.nodes.get(self.topology.primary or "")
        if node is None or node.status is None:
            return None  # no primary known: the relay's retry policy handles it
        queued = node.status.engine.queued
        if queued < self.queue_bound:
            return None
        return Shed(
            429,
            f"the primary is saturated ({queued:.0f} requests queued, bound"
            f" {self.queue_bound}); retry after {self.retry_after}s",
            self.retry_after,
        )

    def _check_pool(self) -> Shed | None:
        now = self.topology.clock()
        serving = [n for n in self.topology.nodes.values() if n.can_serve(now)]
        if not serving or any(n.status is None for n in serving):
            return None  # nothing to judge by: the relay's retry policy handles it
        least = min(n.status.engine.queued for n in serving if n.status is not None)
        if least < self.queue_bound:
            return None
        return Shed(
            429,
            f"every serving node is saturated (at least {least:.0f} requests queued on"
            f" each of {len(serving)}, bound {self.queue_bound}); retry after"
            f" {self.retry_after}s",
            self.retry_after,
        )
