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
and `sglang_ha_relay_quarantined_total` counts it. Everyone else is served as usual,
except a request that happened to be on both failed nodes with the culprit (re-sent
with it after the first crash): the rule cannot tell the two apart, so it is refused
and quarantined too. With distinct prompts that costs only those few requests.

A failure counts when the node's connection broke or the topology abandoned the node
while the request was on it, and the topology then saw the node stop serving (its
engine dead, hung or starting, or its agent gone); a connect error (nothing reached
the node), a timeout or an HTTP status never count.

The fingerprint is blake2b over the endpoint, the prompt fields and the constraint
keys as the endpoint table lists them (grammars, response_format, tools): what can
make an engine crash, not the sampling knobs.

Counting is per relay process: every count is about one request, and the worker that
holds a request sees both failures of its nodes. The verdict is shared with the
gateway's other workers through a folder (`quarantine_dir`), not the store: the
store is for coordination, not request data. No anchor (Patroni, Sentinel, LiteLLM,
SGLang's router) has this: they re-send or give up, without remembering why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ha_agent.atomic_file import write_atomic
from ha_agent.gateway.upstream.transport import FailureCause, UpstreamFailure
from ha_agent.openapi.endpoints import generation

log = logging.getLogger(__name__)

_CRASH_CAUSES = frozenset(
    {FailureCause.ABANDONED, FailureCause.CLOSED, FailureCause.BROKEN, FailureCause.TRUNCATED}
)
MAX_TRACKED = 10_000


def node_died(failure: UpstreamFailure) -> bool:
    """Did this attempt fail because its node went away while holding the request?"""
    return not failure.connect and failure.cause in _CRASH_CAUSES


def fingerprint(kind: str, payload: dict[str, Any]) -> str:
    route = generation(kind)
    assert route is not None, f"no generation endpoint of kind {kind!r}"
    # The prompt fields and constraint keys as the endpoint table lists them.
    prompt = route.prompt_values(payload)
    constraint = route.constraint_values(payload)
    material = json.dumps([kind, prompt, constraint], sort_keys=True, default=str)
    return hashlib.blake2b(material.encode(errors="replace"), digest_size=16).hexdigest()


class Quarantine:
    """Fingerprints refused until a deadline (bounded in number, oldest dropped).

    With `shared` (a folder every relay worker of the gateway can write), a hold is
    also a file `<fingerprint>` holding its wall-clock expiry, so the worker that saw
    the two failures protects its siblings too: a client's next attempt lands on any
    worker (SO_REUSEPORT). A worker rereads the folder only when its mtime moved,
    one stat() per admitted request while nothing is held anywhere.
    """

    def __init__(
        self,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        shared: Path | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self.shared = shared
        self.wall = wall
        self._seen_ns = -1
        self._until: OrderedDict[str, float] = OrderedDict()
        if shared is not None:
            shared.mkdir(parents=True, exist_ok=True)

    def __bool__(self) -> bool:
        self._sync()
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
        self._remember(fp, self.clock() + self.ttl)
        if self.shared is not None:
            try:
                write_atomic(self.shared / fp, repr(self.wall() + self.ttl))
            except OSError as exc:  # this worker still holds it
                log.warning("quarantine not shared with the other workers: %s", exc)

    def _remember(self, fp: str, until: float) -> None:
        self._until.pop(fp, None)
        self._until[fp] = until
        while len(self._until) > MAX_TRACKED:
            self._until.popitem(last=False)

    def _sync(self) -> None:
        """Take in the holds other workers wrote since the last look."""
        if self.shared is None:
            return
        try:
            ns = os.stat(self.shared).st_mtime_ns
        except OSError:
            return
        # The mtime's tick is coarse: two holds within one tick leave it unchanged, so
        # a folder changed within the last second is read again.
        if ns == self._seen_ns and self.wall() - ns / 1e9 > 1.0:
            return
        self._seen_ns = ns
        now_wall, now = self.wall(), self.clock()
        try:
            entries = [e for e in os.scandir(self.shared) if not e.name.startswith(".")]
        except OSError:
            return
        for entry in entries:
            try:
                left = float(Path(entry.path).read_text()) - now_wall
            except (OSError, ValueError):
                continue
            if left <= 0:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif entry.name not in self._until:
                self._remember(entry.name, now + left)
