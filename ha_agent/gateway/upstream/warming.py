"""Keep the standby's prefix cache warm from live traffic.

After a failover the new primary's cache is cold and the first requests pay a full
prefill. So a bounded sample of the requests the primary has served is mirrored to the
standby as prefill-only work: the same prompt, one new token, the answer thrown
away. SGLang's radix cache keeps the prompt's KV, so the same prefixes hit cache
there after a takeover.

Bounded three ways so it never hurts the standby's readiness: a token bucket
(`warm_rate` per second), a cap on mirrors in flight, and no mirroring at all while
the standby reports queued requests. Mirrors carry the rid prefix `HA_WARM_` and
are never counted as user traffic in the relay's metrics.

The budget goes to prefixes the standby has not been sent lately. Plain rate
sampling aliases with periodic traffic (every 8th request of a round-robin over ten
documents only ever hits the even ones: measured by `make bench`), and spends most
mirrors on prefixes already warm. A request's prefix is its prompt without the last
TAIL_CHARS characters (where the question usually varies), in whole blocks.

In pool mode there is no standby: every node serves, and the node that would take a
request over if its node died is the next one on the hash ring (affinity.py). So a
mirror goes to that heir: the node the routing would choose with the request's
current node left out, and only while it is serving with nothing queued. The same
three bounds hold, for the gateway as a whole.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from ha_agent.gateway.admission.limits import prompt_size
from ha_agent.gateway.upstream.affinity import affinity_of
from ha_agent.gateway.upstream.topology import NodeView, Topology
from ha_agent.gateway.upstream.transport import Transport
from ha_agent.openapi.endpoints import GENERATIONS, generation

log = logging.getLogger(__name__)

TAIL_CHARS = 256  # the end of a prompt that does not count as its shared prefix
BLOCK_CHARS = 512  # prefixes are compared in whole blocks of this many characters
RECENT_S = 60.0  # a prefix mirrored this recently is still in the standby's cache
RECENT_MAX = 4096  # prefixes remembered at most


# Top-level options about the answer, not the prompt (the OpenAI requests'): a mirror
# asks for one plain choice.
_ANSWER_KEYS = ("tool_choice", "stream_options", "n", "logprobs", "top_logprobs", "echo")


def prefix_key(kind: str, body: dict[str, Any]) -> str:
    """A short digest of the request's model and prompt, less its last characters."""
    route = generation(kind)
    prompt = route.prompt(body) if route is not None else None
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, default=str)
    # Cut on a block boundary: a tail one character longer must not move the cut.
    cut = max(len(text) - TAIL_CHARS, 0) // BLOCK_CHARS * BLOCK_CHARS
    head = f"{body.get('model', '')}\0{text[:cut]}"
    return hashlib.blake2b(head.encode(errors="replace"), digest_size=12).hexdigest()


def prefill_only(kind: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The request reduced to its prompt and one token, or None if it cannot be: no
    constraint, no minimum length, a budget of 1 (in the endpoint table's keys)."""
    route = generation(kind)
    if route is None or not any(key in body for key in route.prompt_fields):
        return None
    out = copy.deepcopy(body)
    out["stream"] = False
    for key in _ANSWER_KEYS:
        out.pop(key, None)
    if route.params is None:
        params = out
    else:
        sent = out.get(route.params)
        params = out[route.params] = dict(sent) if isinstance(sent, dict) else {}
    for key in (*route.constraint_keys, *route.budget_keys):
        params.pop(key, None)
    if route.min_budget_key is not None:
        params.pop(route.min_budget_key, None)
    params[route.budget_keys[-1]] = 1
    out["rid"] = f"HA_WARM_{uuid.uuid4().hex}"
    return out


class Warmer:
    def __init__(
        self,
        topology: Topology,
        transport: Transport,
        rate: float,
        registry: CollectorRegistry | None,
        max_inflight: int = 4,
        clock: Any = time.monotonic,
        max_chars: int = 65536,
        pool: bool = False,
        affinity_block: int = 256,
        affinity_max_chars: int = 32768,
    ) -> None:
        self.topology = topology
        self.pool = pool
        self.affinity_block = affinity_block
        self.affinity_max_chars = affinity_max_chars
        self.transport = transport
        self.rate = rate
        self.max_inflight = max_inflight
        # A big prompt is never mirrored: tokenizing it would stall the standby too.
        self.max_chars = max_chars
        self.clock = clock
        self._tokens = rate
        self._filled_at = clock()
        self._recent: OrderedDict[str, float] = OrderedDict()  # prefix -> when mirrored
        self._recent_node: str | None = None  # whose cache _recent describes
        self._inflight: set[asyncio.Future[None]] = set()
        self.mirrored = Counter(
            "sglang_ha_relay_warm_mirrors",
            "Prefill-only copies of user requests sent to the standby (not user traffic).",
            ["outcome"],
            registry=registry,
        )

    def _has_token(self) -> bool:
        now = self.clock()
        self._tokens = min(self.rate, self._tokens + (now - self._filled_at) * self.rate)
        self._filled_at = now
        return self._tokens >= 1.0

    def _mirrored_lately(self, node: str, key: str) -> bool:
        if self.pool:
            key = f"{node}\0{key}"  # one heir per prefix, not one standby for all
        elif node != self._recent_node:  # a new standby: its cache is not the old one's
            self._recent.clear()
            self._recent_node = node
        at = self._recent.get(key)
        return at is not None and self.clock() - at < RECENT_S

    def _remember(self, node: str, key: str) -> None:
        if self.pool:
            key = f"{node}\0{key}"
        self._recent[key] = self.clock()
        self._recent.move_to_end(key)
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    def standby(self) -> NodeView | None:
        primary = self.topology.primary
        now = self.topology.clock()
        for node in self.topology.nodes.values():
            if node.name == primary or not node.can_serve(now):
                continue
            if node.status is not None and node.status.engine.queued > 0:
                return None  # the standby is busy: never add to its queue
            return node
        return None

    def heir(self, kind: str, body: dict[str, Any]) -> NodeView | None:
        """Pool mode: the node that would take this request's prefix over if the node
        holding it died; None if the prompt has no prefix key or the heir is busy."""
        affinity = affinity_of(kind, body, self.affinity_block, self.affinity_max_chars)
        if not affinity.keys:
            return None
        now = self.topology.clock()
        order = self.topology.routing_order(affinity=affinity)
        serving = [n for n in order if n.can_serve(now)]
        holder = self.topology.router.learned_home(affinity, (n.name for n in serving))
        if holder is None and serving:
            holder = serving[0].name
        heirs = self.topology.routing_order(exclude={holder or ""}, affinity=affinity)
        node = heirs[0] if heirs else None
        if node is None or not node.can_serve(now) or node.name == holder:
            return None
        if node.status is not None and node.status.engine.queued > 0:
            return None  # never add to a queue
        return node

    def target(self, kind: str, body: dict[str, Any]) -> NodeView | None:
        return self.heir(kind, body) if self.pool else self.standby()

    def offer(self, kind: str, body: dict[str, Any]) -> None:
        """Maybe mirror this request to the standby. Never blocks, never raises."""
        if self.rate <= 0 or len(self._inflight) >= self.max_inflight:
            return
        node = self.target(kind, body)
        if node is None or not self._has_token():
            return
        if sum(prompt_size(kind, body)) > self.max_chars:
            return
        key = prefix_key(kind, body)
        if self._mirrored_lately(node.name, key):
            return  # keep the token for a prefix the standby lacks
        mirror = prefill_only(kind, body)
        if mirror is None:
            return
        self._tokens -= 1.0
        self._remember(node.name, key)
        path = GENERATIONS[kind].path  # prefill_only knows the kind
        task = asyncio.ensure_future(self._send(node, path, mirror))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _send(self, node: NodeView, path: str, body: dict[str, Any]) -> None:
        try:
            async with self.transport.session.post(
                node.engine_url + path,
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:
                await resp.read()
                self.mirrored.labels("ok" if resp.status == 200 else "error").inc()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            self.mirrored.labels("error").inc()
