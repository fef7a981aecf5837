"""Pool mode: which serving node a request goes to.

Two goals pull apart: spread the work (no node idles while another queues) and send
a conversation back to the node whose prefix cache holds its KV. The relay uses
bounded-load consistent hashing (Mirrokni, Thorup, Zadimoghaddam, "Consistent
Hashing with Bounded Loads", 2017) with a learned refinement:

- A prompt is cut into blocks of `HA_AFFINITY_BLOCK_CHARS` characters (up to
  `HA_AFFINITY_MAX_CHARS`); the digest of each whole-block prefix is one *key*. A
  shorter prompt has no key: there is little KV to reuse and it goes to the least
  loaded node.
- The *home* of a request is the node the longest of its keys was last sent to by
  this relay worker (the conversation's earlier turn: its prompt is a prefix of this
  one), else the first node on a hash ring (100 points per node) after the first
  key's digest: the same answer on every relay worker, so prompts sharing their first
  block (a system prompt) meet on one node's cache.
- The load bound: a node takes the request only while its requests in flight (this
  worker's count) plus this one stay within `ceil(HA_AFFINITY_LOAD_FACTOR ×
  (all in flight + 1) / serving nodes) + HA_AFFINITY_LOAD_SLACK`; else the next node
  on the ring that does. So no node holds more than the factor times the average
  plus the slack, and a hot prefix spills over in ring order, the same order on
  every worker. The slack is there because at low load the factor alone is a bound
  of one or two requests, which would send every conversation away from its cache
  while nothing queues anywhere.
- Queues: a node whose engine reports queued requests (its agent's `/ha/status`,
  polled every `HA_POLL_INTERVAL`) counts as over the bound while another serving
  node reports none. When the engines' running slots are the limit, a request that
  would wait in one node's queue while another has free slots is worth more than its
  cached prefix; the bound alone would let the home run 25 % over the average.
- A node that failed, or a retry or a migration away from it, takes the same walk
  without it: its requests go to its ring successor (the node the warmer keeps warm
  for them, warming.py) unless that one is over the bound.

Compared with SGLang's router (`cache_aware`, sgl-router): that keeps an approximate
radix tree of the text sent to each worker and routes to the best match when the
matched share exceeds `cache_threshold`, to the smallest tree otherwise, and
switches to least-load routing while the load is imbalanced (`balance_abs_threshold`
and `balance_rel_threshold` on pending requests). The blocks' digests here are
such a tree sampled at block boundaries, at O(prompt) cost and bounded memory; the
bound replaces the imbalance switch with a cap that always holds.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ha_agent.openapi.endpoints import generation

RING_POINTS = 100  # points per node on the ring: shares within a few % of even
LEARNED_MAX = 65536  # prefix keys remembered per relay worker (LRU)


@dataclass(frozen=True)
class Affinity:
    """A request's prefix keys, shortest first (possibly none)."""

    keys: tuple[bytes, ...] = ()


def affinity_of(kind: str, body: dict[str, Any], block: int, max_chars: int) -> Affinity:
    """The prefix keys of a generation request (none for other requests)."""
    route = generation(kind)
    prompt = route.prompt(body) if route is not None else None
    if prompt is None:
        return Affinity()
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, default=str)
    # The model is part of the key: the same text on another model shares no KV.
    hasher = hashlib.blake2b(str(body.get("model", "")).encode(errors="replace"), digest_size=16)
    keys: list[bytes] = []
    end = min(len(text), max_chars) // block * block
    for start in range(0, end, block):
        hasher.update(text[start : start + block].encode(errors="replace"))
        keys.append(hasher.copy().digest())
    return Affinity(tuple(keys))


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class PrefixRouter:
    """The ring and the learned homes; the caller supplies nodes and their loads."""

    def __init__(self, load_factor: float, load_slack: int = 0) -> None:
        self.load_factor = load_factor
        self.load_slack = load_slack
        self._ring: list[tuple[int, str]] = []
        self._ring_nodes: frozenset[str] = frozenset()
        self._learned: OrderedDict[bytes, str] = OrderedDict()

    def _ring_for(self, names: Iterable[str]) -> list[tuple[int, str]]:
        wanted = frozenset(names)
        if wanted != self._ring_nodes:
            self._ring = sorted(
                (_point(f"{name}#{i}".encode()), name)
                for name in wanted
                for i in range(RING_POINTS)
            )
            self._ring_nodes = wanted
        return self._ring

    def ring_walk(self, key: bytes, names: Sequence[str]) -> list[str]:
        """`names` in ring order after `key`: the consistent-hashing preference."""
        ring = self._ring_for(names)
        if not ring:
            return []
        start = bisect.bisect(ring, (_point(key), ""))
        seen: list[str] = []
        for i in range(len(ring)):
            name = ring[(start + i) % len(ring)][1]
            if name not in seen:
                seen.append(name)
                if len(seen) == len(self._ring_nodes):
                    break
        return seen

    def learned_home(self, affinity: Affinity, among: Iterable[str]) -> str | None:
        """The node the longest of the keys was last sent to, if it is `among`."""
        allowed = set(among)
        for key in reversed(affinity.keys):
            name = self._learned.get(key)
            if name is not None and name in allowed:
                return name
        return None

    def order(
        self,
        affinity: Affinity | None,
        serving: Sequence[str],
        load: Callable[[str], int],
        ring_nodes: Sequence[str] | None = None,
        queued: Callable[[str], bool] = lambda _: False,
    ) -> list[str]:
        """The serving nodes, best first: the home within the bound, else the next on
        the ring within it; then the rest by load. `ring_nodes` (default `serving`)
        places the ring points: every known node, so that a node leaving or
        rejoining moves only its own share."""
        if not serving:
            return []
        backlog = {n: queued(n) for n in serving}
        # A queue counts only while some other node has none.
        if all(backlog.values()):
            backlog = dict.fromkeys(serving, False)
        by_load = sorted(serving, key=lambda n: (backlog[n], load(n), n))
        if affinity is None or not affinity.keys:
            return by_load
        walk = [n for n in self.ring_walk(affinity.keys[0], ring_nodes or serving) if n in serving]
        walk += [n for n in serving if n not in walk]
        home = self.learned_home(affinity, serving)
        if home is not None:
            walk.remove(home)
            walk.insert(0, home)
        total = sum(load(n) for n in serving)
        bound = math.ceil(self.load_factor * (total + 1) / len(serving)) + self.load_slack
        chosen = next((n for n in walk if load(n) + 1 <= bound and not backlog[n]), by_load[0])
        return [chosen, *(n for n in walk if n != chosen)]

    def learn(self, affinity: Affinity | None, node: str) -> None:
        """The request went to `node`: its prefixes are cached there now."""
        if affinity is None:
            return
        for key in affinity.keys:
            self._learned[key] = node
            self._learned.move_to_end(key)
        while len(self._learned) > LEARNED_MAX:
            self._learned.popitem(last=False)
