"""Query-of-death protection: a request that crashes engines is not re-sent forever,
and nothing else is blamed.

The relay re-sends a request whose node failed while it held it (relay.py): right for
a node that died of something else, fatal for a request that *is* the cause (a prompt
that trips a kernel bug, a grammar that crashes the compiler). Re-sent to the next node
at once, it kills that one too, and the pair has no engine left.

Who can be guilty (gate.py applies it):
- Only a crash by the engine's *own exception* counts: the agent reads the engine's
  output ("Scheduler hit an exception", node/engine/process.py) and reports how many
  runs ended so; the relay sees that count rise (topology.py). A kill, an OOM kill, a
  hang or a lost node is no request's doing: every request on it is re-sent, as for
  any failover, and nothing is counted. A request that could be a suspect waits for
  the verdict: until the agent reports the dead run's output read to its end
  (`exit_known`: read again `OUTPUT_SETTLE` after it saw the death, process.py), else
  `EXCEPTION_GRACE` after the node shows down.
- Only a request that had not received anything from that node yet is a *suspect*:
  one that already streamed tokens was past its prefill there. (A non-streaming
  request shows nothing before its answer, so it always is one.)
- A suspect is not re-sent while the crash leaves fewer than two nodes serving (a
  second crash would leave none), and then *alone*: one suspect at a time on the
  engines, across the gateway's relay workers (`Solo`, a lock file in
  `quarantine_dir`), held until its first event or its answer, and on a node it did
  not crash when one serves. Everything else is served meanwhile.
- A suspect that, sent alone, is again on a node when that node's engine crashes of
  its own exception before answering is the culprit: its fingerprint is quarantined
  for `ttl` seconds (503 at admission, saying why; the event QUERY_QUARANTINED; the
  counter `sglang_ha_relay_quarantined_total`). The others it crashed with at first
  are served, one by one, and never quarantined.
- A suspect still waiting after `suspect_wait` seconds is refused with a 503 that says
  it is not quarantined: retrying it is the client's choice.

The fingerprint is blake2b over the endpoint, the prompt fields and the constraint
keys as the endpoint table lists them (grammars, response_format, tools): what can
make an engine crash, not the sampling knobs.

The verdict is shared with the gateway's other workers through a folder
(`quarantine_dir`), not the store: the store is for coordination, not request data.
No anchor (Patroni, Sentinel, LiteLLM, SGLang's router) has this: they re-send or give
up, without remembering why.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ha_agent.atomic_file import write_atomic
from ha_agent.dcs.base import EngineState
from ha_agent.gateway.upstream.topology import Topology
from ha_agent.gateway.upstream.transport import FailureCause, UpstreamFailure
from ha_agent.openapi.endpoints import generation

log = logging.getLogger(__name__)

_CRASH_CAUSES = frozenset(
    {FailureCause.ABANDONED, FailureCause.CLOSED, FailureCause.BROKEN, FailureCause.TRUNCATED}
)
MAX_TRACKED = 10_000
# How long a node may show down (dead, starting) before its agent's count of engine
# exceptions must have risen if its engine died of one, where the agent cannot say it
# has read the run's end (`exit_known`: a container's logs, a sidecar's engine back
# before it was seen gone, a death seen by HTTP before the process watch read it): the
# agent rereads the engine's output
# while the engine is down (a tick, 0.5 s) and the relay polls it (0.5 s).
EXCEPTION_GRACE = 1.5


def node_died(failure: UpstreamFailure) -> bool:
    """Did this attempt fail because its node went away while holding the request?"""
    return not failure.connect and failure.cause in _CRASH_CAUSES


class Cause(enum.Enum):
    """Why a node stopped while a request was on it, as far as a request could be
    to blame."""

    EXCEPTION = "the engine's own exception"  # what a request can cause
    OTHER = "a kill, an OOM kill, a hang or a lost node"  # what no request causes
    NONE = "the node kept serving"  # a connection broke, nothing more


async def still_answering(
    engine_url: str, timeout: float = 0.5, ssl_context: ssl.SSLContext | bool = True
) -> bool:
    """Does the engine's HTTP server still answer? SGLang's HTTP server dies with its
    scheduler (the SIGQUIT handler kills the process tree), so a connection broken by
    a crash finds no server; one broken on a live engine (a stale keep-alive) does.

    An accepted connection alone proves nothing: right after a process killed with
    connections open has reset them, a connect to its port can still complete while
    it exits (seen 16 times in 30 with a Python server SIGKILLed holding 20
    connections on Linux, and by the relay right after a simulator's crash). Only an HTTP
    status line proves a live server, whatever the status: `GET /metrics`, which
    SGLang answers without asking the scheduler and without the API key
    (`srt/utils/auth.py`; 404 without `--enable-metrics`). A live engine
    too busy to answer within `timeout` (SGLang tokenizes in its HTTP process) is
    not taken for one: crash_cause then waits for its agent's word instead.
    """
    url = urlsplit(engine_url)
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        return False
    if host is None:
        return False

    async def status_line() -> bytes:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl_context if url.scheme == "https" else None
        )
        try:
            request = f"GET /metrics HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()

    try:
        line = await asyncio.wait_for(status_line(), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    return line.startswith(b"HTTP/")


async def crash_cause(topology: Topology, name: str, since: float, within: float) -> Cause:
    """How node `name` failed, for a request sent to it at `since` (monotonic): its
    engine's own exception when the agent's count of those rose after `since`."""
    deadline = time.monotonic() + within
    down_since: float | None = None
    node = topology.nodes.get(name)
    healthy = node is not None and not node.failed and node.engine_state is EngineState.HEALTHY
    if (
        healthy
        and node is not None
        and await still_answering(node.engine_url, ssl_context=topology.s.engine_ssl_context())
    ):
        return Cause.NONE
    while True:
        now = time.monotonic()
        node = topology.nodes.get(name)
        if node is None:
            return Cause.OTHER  # decommissioned meanwhile
        if node.exception_seen_at > since:
            return Cause.EXCEPTION
        status = node.status
        if status is None:
            if node.failed:
                return Cause.OTHER  # the agent is gone: a lost node, no verdict on the engine
        elif status.engine.state is EngineState.HUNG or status.engine.oom:
            return Cause.OTHER
        elif not status.engine.healthy and status.engine.exit_known:
            # The agent read the dead run's output to its end (supervisord's log, a
            # sidecar's log file) and its count did not rise above: none is to come.
            return Cause.OTHER
        if node.failed or (status is not None and not status.engine.healthy):
            down_since = now if down_since is None else down_since
            if now - down_since >= EXCEPTION_GRACE:
                return Cause.OTHER
        if now >= deadline:
            return Cause.OTHER if down_since is not None else Cause.NONE
        await asyncio.sleep(0.05)


class Solo:
    """One suspect at a time on the engines, for every relay worker of the gateway.

    With `shared` (the quarantine folder) it is an flock on a file there, polled, so
    a worker that dies holding it frees it (the kernel drops the lock with the fd);
    without, a lock of this process.
    """

    POLL = 0.05

    def __init__(self, shared: Path | None) -> None:
        self.path = shared / ".solo.lock" if shared is not None else None
        self._local = asyncio.Lock()

    async def acquire(self, timeout: float) -> Held | None:
        """The slot, or None when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._local.acquire(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            return None
        if self.path is None:
            return Held(self._local, None)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # unshared folder: this worker alone keeps to the rule
            log.warning("suspects not serialised with the other workers: %s", exc)
            return Held(self._local, None)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return Held(self._local, fd)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                await asyncio.sleep(self.POLL)
        except BaseException:  # cancelled: the client went away
            os.close(fd)
            self._local.release()
            raise
        os.close(fd)
        self._local.release()
        return None


class Held:
    """A held `Solo` slot; `release` is idempotent."""

    __slots__ = ("_fd", "_local")

    def __init__(self, local: asyncio.Lock | None, fd: int | None) -> None:
        self._local, self._fd = local, fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # drops the flock
            self._fd = None
        if self._local is not None:
            self._local.release()
            self._local = None


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
