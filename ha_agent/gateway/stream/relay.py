"""The leader-aware relay: every request to the primary, nothing lost on the way.

Retry policy (after the style note: retry only before the first byte):
- connect error, reset, 500/502/503/504, or the node failing while we wait for
  its answer: nothing has reached the client, so the request is re-sent to the
  next node in `Topology.routing_order()`;
- a 4xx is the client's answer and passes through untouched, never retried, and
  never counted against the node;
- a non-streaming answer is read whole before the client sees it, so a reply that
  breaks half-way is still retried;
- a stream that breaks after its first event is migrated (migration.py), or
  ended with an explicit retryable error event when it cannot be; an engine-side
  abort (status 500/503 in the stream) is such a break, a 400 or the client's own
  abort is the request's end and passes through.

Events are forwarded as they complete, without parsing, so the relay adds no
per-token delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ha_agent import events as ev
from ha_agent.config import RelaySettings
from ha_agent.events import EventLog
from ha_agent.gateway.admission.client_keys import CLIENT, ClientGate
from ha_agent.gateway.admission.gate import Admission, RelayParts
from ha_agent.gateway.admission.policy import FieldPolicy, RequestPolicy, engine_rid, rid_owner
from ha_agent.gateway.admission.prompt_scan import PromptTooLong
from ha_agent.gateway.errors import JSON, refusal, refusal_at
from ha_agent.gateway.metrics import RelayMetrics
from ha_agent.gateway.stream import passthrough, sse
from ha_agent.gateway.stream.migration import ContinuationRefused, Migration, request_caused
from ha_agent.gateway.stream.spares import Spares
from ha_agent.gateway.upstream.affinity import Affinity, affinity_of
from ha_agent.gateway.upstream.topology import Abandonable, NodeView, Topology
from ha_agent.gateway.upstream.transport import (
    RETRYABLE_STATUS,
    FailureCause,
    Transport,
    UpstreamFailure,
    classify,
    forward_headers,
    response_headers,
)
from ha_agent.gateway.upstream.warming import Warmer
from ha_agent.httpcors import Cors, on_prepare
from ha_agent.openapi import inference
from ha_agent.openapi.endpoints import Endpoint, Semantics

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R", bound=web.StreamResponse)

NODE_HEADER = "X-SGLang-HA-Node"
# Which relay worker holds a stream (ha_agent/gateway/edge/workers.py): a stream lives
# and dies with its worker.
WORKER_HEADER = "X-SGLang-HA-Relay-Worker"
MAX_BODY = 64 * 1024 * 1024
# A client this far behind pauses the engine's connection until it is under LOW.
_CLIENT_HIGH = 256 * 1024
_CLIENT_LOW = 64 * 1024


class ClientGone(Exception):
    """The client went away; stop everything for this request."""


def _client_gone_before_head() -> web.StreamResponse:
    """What a handler returns when its client left before the response head went out:
    aiohttp has no one to send it to (499, as Nginx logs a client that closed first)."""
    return web.Response(status=499)


class Attempt(Abandonable):
    """One upstream try, cancellable by the topology when its node fails."""

    __slots__ = ("abandoned", "began", "budget", "node", "since", "stream", "task")

    def __init__(
        self, node: NodeView, since: float, stream: bool = False, budget: int | None = None
    ) -> None:
        self.node = node
        self.since = since
        self.stream = stream
        self.budget = budget
        self.began: float | None = None
        self.task: asyncio.Future[Any] | None = None
        self.abandoned: str | None = None

    def abandon(self, reason: str) -> None:
        if self.abandoned is None:
            self.abandoned = reason
            if self.task is not None:
                self.task.cancel()


class _Retryable(Exception):
    """A complete upstream answer with a status that another node may do better on."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.headers, self.body = status, headers, body


class _Passthrough(Exception):
    """A final non-2xx answer to a streaming request, before anything was sent."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


class Relay:
    def __init__(
        self,
        settings: RelaySettings,
        topology: Topology,
        transport: Transport,
        metrics: RelayMetrics,
        events: EventLog,
        warmer: Warmer | None = None,
    ) -> None:
        self.s = settings
        self.topology = topology
        self.transport = transport
        self.metrics = metrics
        self.events = events
        self.retry_deadline = settings.retry_deadline
        self.warmer = warmer
        # Connections opened ahead of streams; kept only while `spares.run` runs.
        self.spares = Spares(
            topology, transport, settings.spare_connections, settings.spare_max_age
        )
        self.cors = Cors.parse(settings.cors_allow_origins, settings.cors_allow_credentials)
        # Overload and query-of-death checks.
        self.admission = Admission(RelayParts(settings, topology, transport, metrics, events))
        self.policy = RequestPolicy(FieldPolicy.from_settings(settings))
        # Client keys (off on loopback): 401, the key's name, its limits (429).
        self.clients = ClientGate(
            settings,
            max(settings.relay_workers, 1),
            self.policy.policy.engine_authorization,
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        self.policy.install(app)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_response_prepare.append(on_prepare(self.cors))
        return app

    # -- entry ---------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        if self.cors is not None and Cors.is_preflight(request):
            return self._timed("other", False, self.cors.preflight(request), started)
        # The client's key before anything else, as SGLang's middleware (client_keys.py).
        denied = self.clients.identify(request)
        if denied is None:
            denied = self.clients.admit(request)
        if denied is not None:
            self.metrics.clients.labels(request[CLIENT], str(denied.status)).inc()
            return self._timed("other", False, denied, started)
        try:
            response = await self._handle(request, started)
        finally:
            self.clients.release(request)
        self.metrics.clients.labels(request[CLIENT], str(response.status)).inc()
        return response

    async def _handle(self, request: web.Request, started: float) -> web.StreamResponse:
        route: Endpoint | None = None
        payload: dict[str, Any] | None = None
        try:
            # Bad input is answered here and never reaches an engine (inference.py).
            route = inference.check_route(request.method, request.raw_path)
            # A generation request's prompt too long for the context is refused while
            # its body still arrives (prompt_scan.py): 15 MB are neither kept nor parsed.
            scanner = None
            if route.json_body and route.semantics is Semantics.MIGRATE:
                scanner = self.admission.scanner(route.kind, request.content_length)
            body = await self.policy.read_body(request, scanner)
            if route.json_body:
                payload = inference.check_body(route.kind, inference.parse_json(body))
                if route.semantics is not Semantics.SCOPED_ABORT:
                    # Fields that reach files, URLs or code; our rid for theirs (policy.py).
                    body, payload = self.policy.check(request, payload, body).sent
        except inference.BadInput as bad:
            rejected = self._client_error(route, bad)
            return self._timed(_label(route), False, rejected, started)
        except PromptTooLong as long:
            too_long = self.admission.refuse_long(request, long.scanner)
            return self._timed(_label(route), False, too_long, started)
        except web.HTTPRequestEntityTooLarge:
            too_large = inference.BadInput(f"request body over {MAX_BODY} bytes", 413)
            return self._timed(_label(route), False, self._client_error(route, too_large), started)
        endpoint = _label(route)
        if route.semantics is Semantics.SCOPED_ABORT:
            return self._timed(endpoint, False, await self._abort(request, payload), started)
        migrates = route.semantics is Semantics.MIGRATE
        if migrates and payload is not None:
            refused = await self.admission.admit(request, route.kind, payload)
            if refused is not None:
                return self._timed(endpoint, False, refused, started)
        stream = bool(payload and payload.get("stream") is True)
        affinity = self._affinity(route.kind, payload)
        self.metrics.inflight.inc()
        try:
            if stream and migrates and payload is not None:
                response = await self._stream(request, route.kind, payload, body, started, affinity)
            elif stream and route.semantics is Semantics.STREAM_ERROR:
                response = await self._stream_unresumable(request, route, body, affinity)
            else:
                response = await self._unary(request, route, body, affinity)
        finally:
            self.metrics.inflight.dec()
            self.admission.done(request)
        # Mirrored only once the primary has served it (a stream: at its first event,
        # in _stream): a query of death that kills the primary must not kill the
        # standby at the same moment (quarantine.py).
        if (
            self.warmer
            and migrates
            and payload is not None
            and not stream
            and response.status == 200
        ):
            self.warmer.offer(route.kind, payload)
        return self._timed(endpoint, stream, response, started)

    def _timed(self, endpoint: str, stream: bool, response: R, started: float) -> R:
        """Every answer is timed, rejections included (the 4xx latency heatmap)."""
        self.metrics.duration.labels(endpoint, str(stream).lower(), str(response.status)).observe(
            time.monotonic() - started
        )
        return response

    def _client_error(self, route: Endpoint | None, bad: inference.BadInput) -> web.Response:
        """The refusal in SGLang's shape for the route (native /generate, OpenAI...)."""
        self.metrics.requests.labels(_label(route), "-", "client_error", str(bad.status)).inc()
        headers = {"Allow": bad.allow} if bad.allow else None
        return refusal(route, bad, headers)

    # -- abort by rid, for the client that started the request ---------------------------

    async def _abort(self, request: web.Request, payload: dict[str, Any] | None) -> web.Response:
        """SGLang's /abort_request, scoped: a client may abort the requests it started
        (same client key's name when keys are on; else same credential, or same
        address without one) by the `rid` it sent. The
        engine's rid is derived from the client and its rid (policy.engine_rid), so any
        relay worker finds it and no one can name another client's; an unknown one
        answers 200 and does nothing, as SGLang does. abort_all stays admin surface."""
        body = payload or {}
        if body.get("abort_all") not in (None, False):
            bad = inference.BadInput("abort_all is not available through the gateway", 403)
            return self._client_error(None, bad)
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            return web.Response(status=200)
        owner = rid_owner(request, self.policy.policy.engine_authorization)
        data = json.dumps({"rid": engine_rid(owner, rid)}).encode()
        headers = forward_headers(request.headers)
        headers.update(self.transport.admin_headers)
        headers["Content-Type"] = JSON
        for node in self.topology.routing_order():
            try:
                async with self.transport.session.post(
                    node.engine_url + "/abort_request", data=data, headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status == 401:
                        log.error(
                            "%s refused a client's abort with 401: the engine runs with"
                            " --admin-api-key, which admin routes require; give the relay"
                            " HA_ENGINE_ADMIN_API_KEY_FILE",
                            node.name,
                        )
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                log.info("abort of a request on %s failed: %s", node.name, exc)
        return web.Response(status=200)

    # -- picking nodes and running attempts ----------------------------------------------

    async def _run(
        self,
        node: NodeView,
        work: Awaitable[T],
        state: _StreamState | None = None,
        budget: int | None = None,
    ) -> T:
        """`work` on `node`, abandoned if the node fails; `state`: a stream's, whose
        sink marks when the engine began the attempt; `budget`: the completion tokens
        the attempt may take (both for the wait estimate, wait.py)."""
        attempt = Attempt(node, self.topology.clock(), stream=state is not None, budget=budget)
        if state is not None:
            state.attempt = attempt
        task = asyncio.ensure_future(work)
        attempt.task = task
        node.inflight.add(attempt)
        try:
            return await task
        except asyncio.CancelledError:
            if attempt.abandoned is not None:
                raise UpstreamFailure(
                    f"abandoned: {attempt.abandoned}", FailureCause.ABANDONED
                ) from None
            raise
        finally:
            node.inflight.discard(attempt)

    def _tries(self, affinity: Affinity | None = None) -> _Tries:
        return _Tries(self.topology, self.metrics, self.retry_deadline, affinity)

    def _affinity(self, kind: str, payload: dict[str, Any] | None) -> Affinity | None:
        """Pool mode: the request's prefix keys (affinity.py); None in a pair."""
        if not self.topology.pool or payload is None:
            return None
        return affinity_of(kind, payload, self.s.affinity_block_chars, self.s.affinity_max_chars)

    # -- non-streaming -------------------------------------------------------------------

    async def _unary(
        self,
        request: web.Request,
        route: Endpoint,
        body: bytes,
        affinity: Affinity | None = None,
    ) -> web.Response:
        endpoint = _label(route)
        tries = self._tries(affinity)
        last: _Retryable | None = None
        answers = 0
        # Connection-level failures (refused, timed out, abandoned) retry until the
        # deadline: a busy machine or a failover in progress must not turn into a
        # 503. Engine *answers* (5xx) are bounded by max_attempts.
        while answers < self.s.max_attempts:
            avoid, held_back = await self.admission.attempt(request)
            if held_back is not None:
                self.metrics.requests.labels(endpoint, "-", "failed", "503").inc()
                return refusal(route, inference.BadInput(held_back, 503))
            node = await tries.next(avoid)
            if node is None:
                break
            try:
                status, headers, data = await self._run(
                    node, self._fetch(node, request, body), budget=self.admission.budget(request)
                )
            except UpstreamFailure as failure:
                tries.failed(node, failure)
                if why := await self.admission.node_failed(request, node.name, failure):
                    self.metrics.requests.labels(endpoint, "-", "failed", "503").inc()
                    return refusal(route, inference.BadInput(why, 503))
                continue
            except _Retryable as answer:
                answers += 1
                last = answer
                tries.failed(node, UpstreamFailure(f"HTTP {answer.status}", FailureCause.HTTP))
                continue
            outcome = "ok" if status < 400 else "client_error"
            self.metrics.requests.labels(endpoint, node.name, outcome, str(status)).inc()
            if status == 200:
                self.admission.served(request, node.name)
            out_headers = response_headers(headers)
            out_headers[NODE_HEADER] = node.name
            return web.Response(status=status, headers=out_headers, body=data)
        self.metrics.requests.labels(
            endpoint, "-", "failed", str(last.status if last else 503)
        ).inc()
        if last is not None:
            return web.Response(
                status=last.status, headers=response_headers(last.headers), body=last.body
            )
        why = "no node could serve the request: " + tries.latest()
        return refusal(route, inference.BadInput(why, 503))

    async def _fetch(
        self, node: NodeView, request: web.Request, body: bytes
    ) -> tuple[int, Any, bytes]:
        try:
            async with self.transport.session.request(
                request.method,
                node.engine_url + request.path_qs,
                data=body or None,
                headers=forward_headers(request.headers),
            ) as resp:
                data = await resp.read()
                # A 500/503 the request caused itself (an engine abort, migration.py)
                # is its answer: another node would end it the same way.
                if resp.status in RETRYABLE_STATUS and not request_caused(data):
                    raise _Retryable(resp.status, resp.headers, data)
                return resp.status, resp.headers, data
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise classify(exc) from exc

    # -- streaming -----------------------------------------------------------------------

    async def _stream(
        self,
        request: web.Request,
        kind: str,
        payload: dict[str, Any],
        body: bytes,
        started: float,
        affinity: Affinity | None = None,
    ) -> web.StreamResponse:
        migration = Migration(kind, payload, self.s.reasoning_parser)
        state = _StreamState(request, kind, migration, started, self.metrics)
        state.affinity = affinity
        state.worker = self.s.relay_worker_index

        def first_event() -> None:
            # Past its prefill: no suspect of a crash any more, and only now mirrored
            # to the standby (the head comes before the prefill: a query of death
            # mirrored then would crash the standby with the primary).
            self.admission.progressed(request)
            if self.warmer is not None:
                self.warmer.offer(kind, payload)

        state.on_first_event = first_event
        try:
            return await self._stream_loop(state, migration.first_body(body))
        except (ClientGone, asyncio.CancelledError):
            raise
        except Exception as exc:
            # Never cut a client's stream on a bug: end it cleanly and say so.
            log.exception("BUG: unexpected error relaying a %s stream", kind)
            return await self._give_up(state, f"relay error ({type(exc).__name__})")

    async def _stream_loop(self, state: _StreamState, body: bytes) -> web.StreamResponse:
        kind = state.kind
        tries = self._tries(state.affinity)
        segment_body = body
        segment_writes = 0  # events written when the current segment began
        while True:
            avoid, held_back = await self.admission.attempt(state.request)
            if held_back is not None:
                return await self._give_up(state, held_back)
            node = await tries.next(avoid)
            if node is None:
                return await self._give_up(state, "no node could serve it: " + tries.latest())
            budget = self.admission.budget(
                state.request, state.migration.left if state.migrations else None
            )
            try:
                await self._run(
                    node, self._stream_segment(node, state, segment_body), state, budget
                )
            except _Passthrough as final:
                status = final.response.status
                outcome = "client_error" if status < 500 else "failed"
                self.metrics.requests.labels(kind, node.name, outcome, str(status)).inc()
                return final.response
            except UpstreamFailure as failure:
                tries.failed(node, failure)
                # A stream that received events was past its prefill: never a suspect.
                why_stop = await self.admission.node_failed(
                    state.request, node.name, failure, received=state.writes > 0
                )
                if why_stop:
                    return await self._give_up(state, why_stop)
                if not state.started:
                    continue  # nothing sent yet: a plain retry
                if failure.cause is FailureCause.CONTINUATION_REFUSED:
                    # The engine judged the continuation itself (too long, ...): another
                    # node would refuse it too. The client's stream ends, retryable.
                    self.events.emit(
                        ev.STREAM_MIGRATED, f"refused by {node.name}: {failure.reason}"
                    )
                    return await self._give_up(state, failure.reason)
                if state.migrations and state.writes == segment_writes:
                    # The continuation never got going: send it elsewhere as is.
                    state.migration.retry_segment()
                    continue
                # Bytes already reached the client: continue the stream elsewhere.
                next_body = await self._plan_migration(state, node, failure.reason)
                if next_body is None:
                    return state.result()
                segment_body, segment_writes = next_body, state.writes
                tries.restart(node)
                continue
            except ClientGone:
                self.metrics.requests.labels(kind, node.name, "client_gone", "499").inc()
                return state.result()
            outcome = "migrated" if state.migrations else "ok"
            self.metrics.requests.labels(kind, node.name, outcome, "200").inc()
            if state.migrations:
                self.metrics.migrations.labels(kind, "migrated").inc()
                # Its last segment's decode on this node is a service time all the
                # same, for the tokens it had left: in a failover the moved streams
                # are what the survivor finishes first, on the machine as loaded now.
                if (began := state.attempt.began if state.attempt else None) is not None:
                    decode = self.topology.clock() - began
                    self.admission.segment_served(state.request, node.name, decode, budget)
            elif state.first_event_at is not None:
                self.admission.served(state.request, node.name, state.first_event_at)
            return state.result()

    async def _plan_migration(
        self, state: _StreamState, broken: NodeView, why: str
    ) -> bytes | None:
        """The next segment's body, or None once the client's stream has been closed."""
        mig = state.migration
        if state.segment_raw is not None:
            mig.absorb_first_segment(state.segment_raw)
            state.segment_raw = None
        reason = mig.refusal()
        if reason is None and state.migrations >= self.s.migration_limit:
            reason = f"migration limit ({self.s.migration_limit}) reached"
        if reason is None and mig.progress.tokens > self.s.max_sequence_length:
            reason = f"longer than max_sequence_length ({self.s.max_sequence_length})"
        if reason is None and not mig.resumable_stream_format():
            reason = "incremental streaming output cannot be resumed"
        if reason is not None:
            self.metrics.migrations.labels(state.kind, "refused").inc()
            self.events.emit(ev.STREAM_MIGRATED, f"refused after {broken.name} failed: {reason}")
            message = (
                f"stream interrupted: {broken.name} failed and the stream cannot move ({reason})"
            )
            await state.finish(sse.error_event(message + "; retry the request"))
            return None
        body = mig.continuation()
        if body is None:  # the break came after the last token
            await state.finish(mig.closing_events())
            return None
        mig.start_segment()
        state.migrations += 1
        resumed = mig.resume_point
        before_call = (
            f", resumed before its tool call at {resumed.tokens}"
            if resumed is not mig.progress
            else ""
        )
        self.events.emit(
            ev.STREAM_MIGRATED,
            f"{state.kind} stream from {broken.name} after {mig.progress.tokens} tokens"
            f"{before_call} (migration {state.migrations}): {why}",
        )
        return json.dumps(body).encode()

    async def _give_up(self, state: _StreamState, why: str) -> web.StreamResponse:
        if not state.started:
            self.metrics.requests.labels(state.kind, "-", "failed", "503").inc()
            return refusal_at(state.request.path, 503, why)
        self.metrics.migrations.labels(state.kind, "failed").inc()
        self.metrics.requests.labels(state.kind, "-", "failed", "200").inc()
        await state.finish(sse.error_event(f"stream interrupted; {why}; retry the request"))
        return state.result()

    async def _open_segment(
        self, node: NodeView, state: _StreamState, body: bytes
    ) -> tuple[passthrough.UpstreamStream, int, CIMultiDict[str]]:
        """The segment's request sent, on a spare connection where there is one, and
        its answer's head."""
        request = state.request
        headers = self.transport.upstream_headers(request.headers)
        spare = self.spares.take(node.engine_url)
        lost: UpstreamFailure | None = None
        if spare is not None:
            passthrough.send(spare, node.engine_url, request.path_qs, headers, body)
            try:
                status, head = await spare.head()
                return spare, status, head
            except UpstreamFailure as failure:
                spare.close()
                if failure.cause is not FailureCause.CLOSED or spare.received:
                    raise
                # Closed under the request before any answer (the engine closed the
                # idle connection as it was written): a fresh connection instead.
                lost = failure
            except BaseException:
                spare.close()
                raise
        try:
            conn = await passthrough.open_stream(
                node.engine_url,
                request.path_qs,
                headers,
                body,
                self.transport.resolver,
                self.transport.connect_timeout,
                self.transport.ssl,
            )
        except UpstreamFailure:
            if lost is not None:
                raise lost from None  # what a fresh connection closed so would have said
            raise
        try:
            status, head = await conn.head()
        except BaseException:
            conn.close()
            raise
        return conn, status, head

    async def _stream_segment(self, node: NodeView, state: _StreamState, body: bytes) -> None:
        conn, status, headers = await self._open_segment(node, state, body)
        try:
            if status != 200:
                data = await conn.read_all()
                if status in RETRYABLE_STATUS:
                    raise UpstreamFailure(f"HTTP {status}", FailureCause.HTTP)
                if state.started:
                    # An engine error (501...) is an engine's answer; anything else, a refusal.
                    cause = (
                        FailureCause.HTTP if status >= 500 else FailureCause.CONTINUATION_REFUSED
                    )
                    raise UpstreamFailure(f"continuation refused with HTTP {status}", cause)
                raise _Passthrough(
                    web.Response(status=status, headers=response_headers(headers), body=data)
                )
            await state.begin(node, headers)
            await conn.pump(self._sink(state, conn))
        finally:
            conn.close()

    def _sink(self, state: _StreamState, conn: passthrough.UpstreamStream) -> passthrough.Sink:
        """Whole events, as they come, to the client, from the engine connection's
        callbacks (passthrough.py). On the first segment the bytes go through untouched
        but for two byte searches (an engine abort; the running usage the relay
        asked for, cut off again): nothing is parsed unless the stream breaks
        (absorb_first_segment). Continuations are rewritten event by event (rare)."""
        mig = state.migration
        rewrite = state.migrations > 0
        send = state.send
        client = state.client_transport
        assert client is not None  # begin() came first
        pending = b""  # an event not yet complete
        attempt, clock = state.attempt, self.topology.clock

        def sink(chunk: bytes) -> bool:
            nonlocal pending
            if attempt is not None and attempt.began is None:
                attempt.began = clock()  # the engine's first bytes: past its queue
            if pending:
                chunk = pending + chunk
            cut = chunk.rfind(b"\n\n") + 2
            if cut == 1:  # no event ends here (rfind gave -1)
                pending = chunk
                return False
            if cut == len(chunk):  # the usual case: the read ends on an event
                out, pending = chunk, b""
            else:
                out, pending = chunk[:cut], chunk[cut:]
            if rewrite:
                try:
                    out, abort = mig.rewrite(out)
                except ContinuationRefused as refused:
                    raise UpstreamFailure(str(refused), FailureCause.CONTINUATION_REFUSED) from None
            else:
                raw, out, abort = mig.screen(out)
                state.keep_raw(raw)
            if out and send(out) > _CLIENT_HIGH:
                conn.pause_until_drained(client, _CLIENT_LOW)
            if abort is not None:
                # The engine ended the stream on its own fault (500/503): a break.
                raise UpstreamFailure(abort, FailureCause.ENGINE_ABORT)
            return out.endswith(sse.DONE)

        return sink

    # -- streams that cannot move (the Responses API) ------------------------------------

    async def _stream_unresumable(
        self,
        request: web.Request,
        route: Endpoint,
        body: bytes,
        affinity: Affinity | None = None,
    ) -> web.StreamResponse:
        """Retried before its first byte like a unary request; a break after it ends
        the client's stream with an explicit `error` event (the Responses API's own
        ResponseErrorEvent), never a silent cut."""
        tries = self._tries(affinity)
        out = _Unresumable()
        while True:
            node = await tries.next()
            if node is None:
                break
            try:
                await self._run(node, self._relay_events(node, request, body, out))
            except _Passthrough as final:
                return final.response
            except ClientGone:
                self.metrics.requests.labels(route.kind, node.name, "client_gone", "499").inc()
                return out.result()
            except UpstreamFailure as failure:
                tries.failed(node, failure)
                if out.response is None:
                    continue  # nothing sent yet: a plain retry
                self.metrics.requests.labels(route.kind, node.name, "failed", "200").inc()
                await out.fail(f"stream interrupted: {node.name} failed ({failure.reason})")
                return out.result()
            self.metrics.requests.labels(route.kind, node.name, "ok", "200").inc()
            return out.result()
        why = "no node could serve the request: " + tries.latest()
        return refusal(route, inference.BadInput(why, 503))

    async def _relay_events(
        self, node: NodeView, request: web.Request, body: bytes, out: _Unresumable
    ) -> None:
        try:
            async with self.transport.session.request(
                request.method,
                node.engine_url + request.path_qs,
                data=body,
                headers=forward_headers(request.headers),
            ) as upstream:
                if upstream.status != 200:
                    data = await upstream.read()
                    if upstream.status in RETRYABLE_STATUS:
                        raise UpstreamFailure(f"HTTP {upstream.status}", FailureCause.HTTP)
                    headers = response_headers(upstream.headers)
                    raise _Passthrough(
                        web.Response(status=upstream.status, headers=headers, body=data)
                    )
                await out.begin(request, node, upstream)
                splitter = sse.EventSplitter()
                async for chunk in upstream.content.iter_any():
                    events = splitter.feed(chunk)
                    if events:
                        await out.write(events)
                if not out.finished:
                    raise UpstreamFailure("stream ended before its final event")
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise classify(exc) from exc


class _Tries:
    """The nodes one request tries, in routing order: each once; once all failed, a
    short pause (a promotion may be under way) and another round, until the deadline."""

    def __init__(
        self,
        topology: Topology,
        metrics: RelayMetrics,
        deadline_s: float,
        affinity: Affinity | None = None,
    ) -> None:
        self.topology = topology
        self.metrics = metrics
        self.deadline_s = deadline_s
        self.affinity = affinity  # pool mode: where the prompt's prefix is cached
        self.failures: list[str] = []  # "node: reason", for the final answer
        self.restart()

    def restart(self, broken: NodeView | None = None) -> None:
        """A fresh deadline and round (a stream moving on from the `broken` node)."""
        self.tried = {broken.name} if broken is not None else set()
        self.rounds = 0
        self.deadline = time.monotonic() + self.deadline_s

    async def next(self, avoid: set[str] | frozenset[str] = frozenset()) -> NodeView | None:
        """The node to try next, or None once the deadline passed; one in `avoid` only
        when no other is left to try."""
        while True:
            order = self.topology.routing_order(exclude=self.tried, affinity=self.affinity)
            if order:
                now = self.topology.clock()
                chosen = next(
                    (n for n in order if avoid and n.can_serve(now) and n.name not in avoid),
                    order[0],
                )
                self.topology.sent(chosen, self.affinity)
                return chosen
            if time.monotonic() >= self.deadline:
                return None
            self.tried.clear()
            await asyncio.sleep(min(0.1 * 2**self.rounds, 1.0))
            self.rounds += 1

    def failed(self, node: NodeView, failure: UpstreamFailure) -> None:
        self.tried.add(node.name)
        if failure.connect:
            self.topology.connect_failed(node)
        self.metrics.retries.labels(node.name, _RETRY_LABEL[failure.cause]).inc()
        log.info("attempt on %s failed: %s", node.name, failure.reason)
        self.failures.append(f"{node.name}: {failure.reason}")

    def latest(self) -> str:
        """The last few failures, for the answer that gives up."""
        return "; ".join(self.failures[-4:])


class _Unresumable:
    """The client's side of a Responses API stream (`event:` + `data:` events that end
    with response.completed / .incomplete / .failed or an error, no [DONE])."""

    FINAL = (
        b"event: response.completed",
        b"event: response.incomplete",
        b"event: response.failed",
        b"event: error",
    )

    def __init__(self) -> None:
        self.response: web.StreamResponse | None = None
        self.last = b""

    @property
    def finished(self) -> bool:
        event = self.last.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        return event.startswith(self.FINAL)

    def result(self) -> web.StreamResponse:
        return self.response if self.response is not None else _client_gone_before_head()

    async def begin(
        self, request: web.Request, node: NodeView, upstream: aiohttp.ClientResponse
    ) -> None:
        headers = response_headers(upstream.headers)
        headers[NODE_HEADER] = node.name
        headers["X-Accel-Buffering"] = "no"
        response = web.StreamResponse(status=200, headers=headers)
        try:
            await response.prepare(request)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone() from exc
        self.response = response

    async def write(self, events: bytes) -> None:
        assert self.response is not None
        self.last = events
        try:
            await self.response.write(events)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone() from exc

    async def fail(self, message: str) -> None:
        """End with the Responses API's error event, numbered after the last one sent."""
        number = 0
        for event in sse.iter_json(self.last):
            seq = event.get("sequence_number")
            if isinstance(seq, int):
                number = seq + 1
        error = {
            "type": "error",
            "code": "503",
            "message": message + "; retry the request",
            "param": None,
            "sequence_number": number,
        }
        data = b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
        assert self.response is not None
        try:
            await self.response.write(data)
            await self.response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass


def _label(route: Endpoint | None) -> str:
    """The metrics label: the generation kind, or "other" (a bounded set)."""
    return route.kind if route is not None and route.generation else "other"


@dataclass(eq=False)
class _StreamState:
    """The client's side of one streaming request, across segments."""

    request: web.Request
    kind: str
    migration: Migration
    started_at: float
    metrics: RelayMetrics
    response: web.StreamResponse | None = None
    client_transport: asyncio.Transport | None = None
    migrations: int = 0
    writes: int = 0
    worker: int = 0
    on_first_event: Callable[[], None] | None = None  # past its prefill (quarantine, warming)
    affinity: Affinity | None = None  # pool mode: the prompt's prefix keys
    first_event_at: float | None = None  # monotonic: its decode's start (service time)
    attempt: Attempt | None = None  # the current segment's upstream try
    _chunked: bool = True
    # The first segment's events, unparsed, as a list: joined only if the stream
    # breaks (adding bytes to bytes copied the whole stream on every event).
    _raw: list[bytes] | None = field(default_factory=list)  # None once read
    _first_event_sent: bool = False

    def __post_init__(self) -> None:
        self._latest_only = self.migration.latest_event_holds_all

    @property
    def started(self) -> bool:
        return self.response is not None and self.response.prepared

    def result(self) -> web.StreamResponse:
        return self.response if self.response is not None else _client_gone_before_head()

    @property
    def segment_raw(self) -> bytes | None:
        """The first segment as received, or None once it has been read."""
        return None if self._raw is None else b"".join(self._raw)

    @segment_raw.setter
    def segment_raw(self, value: bytes | None) -> None:
        self._raw = None if value is None else [value]

    def keep_raw(self, out: bytes) -> None:
        if self._raw is None or not out:
            return
        if self._latest_only:
            self._raw = [out]
        else:
            self._raw.append(out)

    async def begin(self, node: NodeView, upstream_headers: CIMultiDict[str]) -> None:
        if self.response is not None:
            return  # a continuation: the client's response is already under way
        headers = response_headers(upstream_headers)
        headers[NODE_HEADER] = node.name
        headers[WORKER_HEADER] = str(self.worker)
        headers["X-Accel-Buffering"] = "no"  # tell Nginx not to buffer, whatever its config
        headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(status=200, headers=headers)
        try:
            await response.prepare(self.request)
            await response.write(b"")  # the head goes out now: events go straight after
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone() from exc
        self.response = response
        self.client_transport = self.request.transport
        self._chunked = response.headers.get("Transfer-Encoding", "").lower() == "chunked"

    def send(self, data: bytes) -> int:
        """Events to the client's socket, framed as aiohttp would have: returns the
        bytes the client has not taken yet (passthrough.py pauses the engine above a bound)."""
        t = self.client_transport
        if t is None or t.is_closing():
            raise ClientGone()
        t.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        self.writes += 1
        if not self._first_event_sent:
            # The bookkeeping of the first event (metric, quarantine, warming) comes
            # after its write: the client's time to first token does not wait for it.
            self._first_event_sent = True
            self.first_event_at = time.monotonic()
            self.metrics.ttft.labels(self.kind).observe(self.first_event_at - self.started_at)
            if self.on_first_event is not None:
                self.on_first_event()
        return t.get_write_buffer_size()

    async def finish(self, tail: bytes) -> None:
        assert self.response is not None
        data = tail if tail.endswith(sse.DONE) else tail + sse.DONE
        try:
            await self.response.write(data)
            await self.response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass


# The retry counter's label per failure cause (a bounded set, no free text). A connection
# that closed or failed before the response has always been counted as `connect`.
_RETRY_LABEL = {
    FailureCause.CONNECT: "connect",
    FailureCause.CLOSED: "connect",
    FailureCause.ABANDONED: "node_failed",
    FailureCause.TIMEOUT: "timeout",
    FailureCause.BROKEN: "broken",
    FailureCause.HTTP: "http_5xx",
    FailureCause.TRUNCATED: "truncated",
    FailureCause.CONTINUATION_REFUSED: "continuation_refused",
    FailureCause.ENGINE_ABORT: "engine_abort",
    FailureCause.OTHER: "other",
}
