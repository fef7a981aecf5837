"""Query-of-death protection: a request that crashes engines is not re-sent forever.

The relay re-sends a request whose node failed while it held it (relay.py): right for
a node that died of something else, fatal for a request that *is* the cause (a prompt
that trips a kernel bug, a grammar that crashes the compiler). Re-sent to the next node,
it kills that one too, and a client that retries kills them in turn.

The rule (admission.py applies it): a request may be in flight on a node that failed
*once*, and is re-sent; when a second, different node fails holding that same request,
its fingerprint is quarantined for `ttl` seconds. Counted per request, never across
requests: identical prompts (a shared system prompt, a load test) on nodes that died
for unrelated reasons are no query of death. A quarantined request is answered 503
at admission with a message that says why, the event QUERY_QUARANTINED is logged,
and `sglang_ha_relay_quarantined_total` counts it. Everyone else is served as usual.

A failure counts when the node's connection broke or the topology abandoned the node
while the request was on it, and the topology then saw the node stop serving (its
engine dead, hung or starting, or its agent gone); a connect error (nothing reached
the node), a timeout or an HTTP status never count.

The fingerprint is blake2b over the endpoint, the prompt and the constraint fields
(regex, json_schema, ebnf, response_format): what can make an engine crash, not the
sampling knobs.

State is per relay process, on purpose: the store is for coordination, not business
data, and every count here is about one request: the worker that holds a request sees
both failures of its nodes. No anchor (Patroni, Sentinel, LiteLLM,
SGLang's router) has this: they re-send or give up, without remembering why.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ha_agent.gateway.migration import CHAT, COMPLETIONS, GENERATE

_CRASH_MARKS = (
    "abandoned",
    "connection closed",
    "response body broken",
    "connection error",
    "without [DONE]",
)
_CONSTRAINT_FIELDS = ("regex", "json_schema", "ebnf", "response_format", "structural_tag")
MAX_TRACKED = 10_000


def node_died(reason: str, connect: bool) -> bool:
    """Did this attempt fail because its node went away while holding the request?"""
    return not connect and any(mark in reason for mark in _CRASH_MARKS)


def fingerprint(kind: str, payload: dict[str, Any]) -> str:
    if kind == GENERATE:
        params = payload.get("sampling_params")
        prompt: Any = [payload.get("text"), payload.get("input_ids")]
        constraint = (
            {k: params.get(k) for k in _CONSTRAINT_FIELDS} if isinstance(params, dict) else params
        )
    else:
        prompt = payload.get("messages") if kind == CHAT else payload.get("prompt")
        constraint = {k: payload.get(k) for k in _CONSTRAINT_FIELDS}
    assert kind in (GENERATE, CHAT, COMPLETIONS)
    material = json.dumps([kind, prompt, constraint], sort_keys=True, default=str)
    return hashlib.blake2b(material.encode(errors="replace"), digest_size=16).hexdigest()


class Quarantine:
    """Fingerprints refused until a deadline (bounded in number, oldest dropped)."""

    def __init__(
        self,
        ttl: float = 600.0,
        window: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.window = window  # how long a first failure is remembered
        self.clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._until)

    def held(self, fp: str) -> float:
        """Seconds left in quarantine for this fingerprint, 0 when it is free."""
        until = self._until.get(fp)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._until[fp]
            return 0.0
        return left

    def hold(self, fp: str) -> None:
        self._until.pop(fp, None)
        self._until[fp] = self.clock() + self.ttl
        while len(self._until) > MAX_TRACKED:
            self._until.popitem(last=False)
