"""HTTP routes of the simulator: SGLang's API surface plus the ``/sim/faults`` admin knobs.

``create_app(settings)`` builds an aiohttp application; tests run it in-process, the
``sglang-ha-sim`` entry point serves it. Every answer that describes the server says it
is a simulator (model name, ``/server_info``, ``/model_info``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ha_agent import __version__
from ha_agent.config import SimSettings
from ha_agent.httpcors import Cors, on_prepare
from ha_agent.openapi.endpoints import ROUTES
from ha_agent.sim.extra_routes import ExtraRoutes
from ha_agent.sim.faults import FaultError, Faults, die_of_oom
from ha_agent.sim.generator import SamplingKey
from ha_agent.sim.grammar import GrammarError
from ha_agent.sim.lifecycle import Lifecycle
from ha_agent.sim.metrics import SimMetrics
from ha_agent.sim.protocol import (
    BadRequest,
    OpenAICall,
    RequestBuilder,
    parse_abort,
    parse_pause_mode,
)
from ha_agent.sim.responses import (
    DONE,
    ChatFormatter,
    CompletionFormatter,
    abort_error_body,
    dumps,
    engine_abort,
    generate_payload,
    native_error,
    openai_error,
    sse,
)
from ha_agent.sim.scheduler import (
    HEALTH_CHECK_RID_PREFIX,
    DuplicateRequestId,
    Engine,
    GenRequest,
    Job,
)
from ha_agent.sim.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_FLUSH_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)
# http_server.flush_cache: a refusal answers FlushCacheReqOutput.message, empty for a busy
# scheduler (Scheduler.flush_cache), hence this fallback.
_FLUSH_FAILED_TEXT = "Flush cache failed.\n"
_OOM_DELAY = 0.05  # let the POST's answer leave before the process dies
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


def _empty(status: int) -> web.Response:
    return web.Response(status=status)


async def _read_json(request: web.Request, allow_empty: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip() and allow_empty:
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"Invalid request: JSON decode error: {exc}", validation=True) from None


def _bad_request(exc: BadRequest, native: bool) -> web.Response:
    if exc.validation:  # FastAPI's RequestValidationError, rendered by SGLang's handler
        return _json(openai_error(exc.message, "Bad Request", 400), 400)
    if native:
        return _json(native_error(exc.message), 400)
    err_type = "BadRequest" if exc.converting else "BadRequestError"
    return _json(openai_error(exc.message, err_type, 400), 400)


# Routes SGLang marks @auth_level(AuthLevel.ADMIN_OPTIONAL) (http_server.py).
_ADMIN_OPTIONAL = frozenset(
    {"/flush_cache", "/abort_request", "/pause_generation", "/continue_generation"}
)


def _bearer_matches(header: str | None, key: str) -> bool:
    """auth.py _check_bearer_token: "Bearer <key>" (scheme case-insensitive), constant time."""
    if not header:
        return False
    parts = header.split(" ", 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return False
    return hmac.compare_digest(parts[1].encode(), key.encode())


def auth_allows(
    method: str, path: str, header: str | None, api_key: str | None, admin_key: str | None
) -> bool:
    """decide_request_auth (python/sglang/srt/utils/auth.py) for the levels SGLang uses."""
    if method == "OPTIONS" or path.startswith("/health") or path.startswith("/metrics"):
        return True
    if path in _ADMIN_OPTIONAL:
        # Only the admin key when one is set (the api key is then refused), else the api key.
        key = admin_key or api_key
        return key is None or _bearer_matches(header, key)
    return api_key is None or _bearer_matches(header, api_key)


def _api_key_middleware(api_key: str | None, admin_key: str | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        # /sim/* is the simulator's own admin surface (SIM_ADMIN_TOKEN), not SGLang's.
        if request.path.startswith("/sim/") or auth_allows(
            request.method,
            request.path,
            request.headers.get("Authorization"),
            api_key,
            admin_key,
        ):
            return await handler(request)
        return _json({"error": "Unauthorized"}, 401)

    return check


def _preflight(cors: Cors) -> Any:
    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if Cors.is_preflight(request):
            return cors.preflight(request)
        return await handler(request)

    return preflight


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """FastAPI-style JSON for 404/405, and a logged 500 for anything unexpected."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json({"detail": "Not Found"}, 404)
    except web.HTTPMethodNotAllowed:
        return _json({"detail": "Method Not Allowed"}, 405)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("BUG: unhandled error on %s %s", request.method, request.path)
        return _json(openai_error("Internal server error", "InternalServerError", 500), 500)


class SimServer:
    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.tokenizer = get_tokenizer()
        self.metrics = SimMetrics(settings.model_name, settings.decode_log_interval)
        self.faults = Faults()
        try:
            self.faults.update(dict(settings.faults))
        except FaultError as exc:
            raise ValueError(f"SIM_FAULTS: {exc}") from None
        self.engine = Engine(settings, self.tokenizer, self.metrics, self.faults)
        self.builder = RequestBuilder(settings, self.tokenizer)
        self.created = int(time.time())
        self.termination = Lifecycle(self)

    # -- lifecycle ------------------------------------------------------------------
    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        engine = self.engine
        engine.ready_at = time.monotonic() + self.settings.startup_delay
        watchers = [
            asyncio.create_task(engine.watch_disconnects(), name="sim-disconnects"),
            asyncio.create_task(self.termination.sigterm_watchdog(), name="sim-sigterm"),
            asyncio.create_task(self.termination.scheduler_watchdog(), name="sim-watchdog"),
        ]
        self.termination.note_faults()
        loop = asyncio.get_running_loop()
        oom = loop.call_later(self.settings.startup_delay, die_of_oom) if self.faults.oom else None
        yield
        if oom is not None:
            oom.cancel()
        for watcher in watchers:
            watcher.cancel()
        for watcher in watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def on_shutdown(self, app: web.Application) -> None:
        # After SGLang's SIGTERM drain nothing is left to wait for (or, when its last
        # /health failed, nothing is waited for); drain_timeout is for SIGINT.
        grace = 0.0 if self.termination.exited else self.settings.drain_timeout
        await self.engine.shutdown(grace)

    # -- health and info ------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        """SGLang's health_generate (python/sglang/srt/entrypoints/http_server.py).

        A 1-token generation (rid HEALTH_CHECK_*, input_ids [0], not counted in metrics)
        goes to the scheduler. An idle scheduler runs it like any request, its output
        through the detokenizer; a busy one does not queue it but signals back after its
        next batch result, skipping the detokenizer (Scheduler.process_input_requests,
        maybe_send_health_check_signal). The answer is 200 as soon as *any* output
        reached the tokenizer after the check began (other requests' tokens count,
        sglang#6624), looked at every second, else 503 after SGLANG_HEALTH_CHECK_TIMEOUT.
        A check that did run is not aborted on either outcome.
        """
        e, s = self.engine, self.settings
        if e.shutting_down or self.termination.gracefully_exit:
            return _empty(503)
        if not e.started() or self.faults.fail_health:
            return _empty(503)
        gen = GenRequest(
            prompt_text=self.tokenizer.decode([0]),
            prompt_ids=[0],
            max_new_tokens=1,
            sampling=SamplingKey(temperature=0.0),
            rid=f"{HEALTH_CHECK_RID_PREFIX}_{uuid.uuid4().hex}",
            log_metrics=False,
        )
        tic = time.monotonic()
        if not e.health_check():
            e.submit(gen)
        deadline = tic + s.health_check_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(s.health_check_interval)
            if e.last_output_at > tic:
                self.termination.health_failed = False  # server_status = ServerStatus.Up
                return _empty(200)
        log.error(
            "Health check failed. Server couldn't get a response from detokenizer for last "
            "%g seconds.",
            s.health_check_timeout,
        )
        self.termination.health_failed = True  # server_status = ServerStatus.UnHealthy
        return _empty(503)

    async def model_info(self, request: web.Request) -> web.Response:
        name = self.settings.model_name
        return _json(
            {
                "model_path": name,
                "tokenizer_path": name,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": self.settings.weight_version,
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "sglang-ha-simulator",
                "architectures": ["SglangHaSimulator"],
                "simulator": True,
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        s, e = self.settings, self.engine
        live = e.stats()
        return _json(
            {
                "simulator": True,
                "version": f"sglang-ha-sim {__version__} (simulator, not SGLang)",
                "instance_name": s.instance_name,
                "model_path": s.model_name,
                "served_model_name": s.model_name,
                "tokenizer_path": s.model_name,
                "host": s.host,
                "port": s.port,
                "context_length": s.context_length,
                "chunked_prefill_size": s.chunked_prefill_size,
                # TpModelWorker.get_worker_info: max_req_len - 5 (scheduler_info).
                "max_req_input_len": min(s.context_length - 1, s.max_total_tokens - 1) - 5,
                "max_running_requests": s.max_running_requests,
                "max_total_num_tokens": s.max_total_tokens,
                "page_size": s.page_size,
                "enable_metrics": True,
                "enable_cache_report": s.enable_cache_report,
                "weight_version": s.weight_version,
                "vocab_size": self.tokenizer.vocab_size,
                # Scheduler.get_init_info's handshake status, merged in as scheduler_info;
                # the tokenizer's Starting/Up is not reported here.
                "status": "ready",
                "paused": e.paused,  # the simulator's own (SGLang has no such field)
                # One entry per data-parallel rank (the simulator has one); the
                # scheduler's running slots as `get_internal_state` reports them
                # (srt/managers/scheduler.py), what the relay's wait estimate reads.
                "internal_states": [
                    {
                        "effective_max_running_requests_per_dp": s.max_running_requests,
                        "last_gen_throughput": e.metrics.published.gen_throughput,
                        "num_running_reqs": live.num_running_reqs,
                        "num_queue_reqs": live.num_queue_reqs,
                    }
                ],
            }
        )

    def _model_card(self) -> dict[str, Any]:
        name = self.settings.model_name
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "sglang-ha-sim",
            "root": name,
            "parent": None,
            "max_model_len": self.settings.context_length,
        }

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.settings.model_name:
            return _json(
                {
                    "error": {
                        "message": f"The model '{name}' does not exist",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "model_not_found",
                    }
                },
                404,
            )
        return _json(self._model_card())

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        body = self.engine.render_metrics()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- control --------------------------------------------------------------------
    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            rid, abort_all = parse_abort(await _read_json(request))
        except BadRequest as exc:
            return _bad_request(exc, native=True)
        self.engine.abort(rid, abort_all)
        return _empty(200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        try:
            mode = parse_pause_mode(await _read_json(request, allow_empty=True))
        except BadRequest as exc:
            return _bad_request(exc, native=True)
        self.engine.pause(mode)
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.engine.resume()
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        ok = self.engine.flush_cache()
        if ok:
            return web.Response(text=_FLUSH_TEXT)
        return web.Response(text=_FLUSH_FAILED_TEXT, status=400)

    # -- fault knobs ----------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        # Closed without a token: the knobs can hang or kill the engine.
        token = self.settings.admin_token
        if token is None:
            return False
        # aiohttp keeps undecodable header bytes as surrogates: compare bytes, no 500.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        expected = ("Bearer " + token.get_secret_value()).encode()
        return hmac.compare_digest(given, expected)

    async def sim_faults(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _json({"detail": "Unauthorized"}, 401)
        if request.method == "DELETE":
            self.faults.clear()
        elif request.method == "POST":
            try:
                self.faults.update(await _read_json(request))
            except (FaultError, BadRequest) as exc:
                return _json({"detail": str(exc)}, 400)
            if self.faults.oom:
                asyncio.get_running_loop().call_later(_OOM_DELAY, die_of_oom)
            log.warning("sglang-ha-sim fault knobs now %s", self.faults.as_dict())
        self.termination.note_faults()
        return _json(self.faults.as_dict())

    # -- generation -----------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        body: Any = None
        try:
            body = await _read_json(request)
            call = self.builder.generate(body)
        except BadRequest as exc:
            if not exc.validation and isinstance(body, dict) and body.get("stream") is True:
                return await _in_band_error(request, exc.message)
            return _bad_request(exc, native=True)
        job = self._start(request, call.gen, native=True)
        if isinstance(job, web.Response):
            if job.status == 400 and call.stream:  # a duplicate rid: tokenizer_manager's
                return await _in_band_error(request, _error_message(job))
            return job
        if not call.stream:
            return await _whole(job, lambda: generate_payload(job, call.return_prompt_token_ids))
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)  # /generate sends headers before the first token
        with _client_watch(job):
            async for _ in job.updates():
                await resp.write(sse(generate_payload(job, call.return_prompt_token_ids)))
            await resp.write(DONE)
            await resp.write_eof()
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    chat = chat_completions  # the endpoint kinds' names (openapi/endpoints.py)
    abort = abort_request

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        media = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            msg = "Unsupported Media Type: Only 'application/json' is allowed"
            return _bad_request(BadRequest(msg, validation=True), native=False)
        try:
            body = await _read_json(request)
            call: OpenAICall = self.builder.chat(body) if chat else self.builder.completion(body)
        except BadRequest as exc:
            return _bad_request(exc, native=False)
        job = self._start(request, call.gen, native=False)
        if isinstance(job, web.Response):
            return job
        cache_report = self.settings.enable_cache_report
        fmt = (
            ChatFormatter(call, job, cache_report)
            if chat
            else CompletionFormatter(call, job, cache_report)
        )
        if not call.stream:
            return await _whole(job, fmt.response)
        resp: web.StreamResponse | None = None
        with _client_watch(job):
            # Like SGLang, headers go out with the first chunk (after prefill).
            async for _ in job.updates():
                chunks = fmt.chunks()
                if resp is None:
                    resp = web.StreamResponse(headers=_SSE_HEADERS)
                    await resp.prepare(request)
                for chunk in chunks:
                    await resp.write(chunk)
            if resp is None:  # pragma: no cover - a job always reports at least once
                resp = web.StreamResponse(headers=_SSE_HEADERS)
                await resp.prepare(request)
            for chunk in fmt.tail():
                await resp.write(chunk)
            await resp.write(DONE)
            await resp.write_eof()
        return resp if resp is not None else web.Response(status=499)

    def _start(self, request: web.Request, gen: Any, native: bool) -> Job | web.Response:
        """Submit to the engine, or answer with the error the request deserves."""
        if self.engine.shutting_down:
            msg = "The server is shutting down."
            return _json(
                native_error(msg) if native else openai_error(msg, "ServiceUnavailable", 503), 503
            )
        if self.faults.next_request_fails():
            msg = "Internal server error: simulated failure (sglang-ha-sim fault knob error_rate)"
            body = native_error(msg) if native else openai_error(msg, "InternalServerError", 500)
            return _json(body, 500)
        try:
            return self.engine.submit(gen, request)
        except (DuplicateRequestId, GrammarError) as exc:
            return _bad_request(BadRequest(str(exc)), native)


SIM_KEY = web.AppKey("sglang_ha_sim", SimServer)


async def _in_band_error(request: web.Request, message: str) -> web.StreamResponse:
    """http_server.py `generate_request` with `stream: true`: the tokenizer manager's
    ValueError (prompt too long, bad sampling parameters, duplicate rid) comes after the
    200 headers, as one `error` event (`code` 400, `retryable` false), then [DONE]."""
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    error = {"message": message, "type": "invalid_request_error", "code": 400, "retryable": False}
    await resp.write(sse({"error": error}))
    await resp.write(DONE)
    await resp.write_eof()
    return resp


def _error_message(resp: web.Response) -> str:
    try:
        return str(json.loads(resp.body)["error"]["message"])  # type: ignore[arg-type]
    except (ValueError, KeyError, TypeError):
        return "Invalid request"


async def _whole(job: Job, payload: Callable[[], Any]) -> web.Response:
    """A non-streaming answer: the finished job's payload, or its engine abort's status
    and error (tokenizer_manager.py, `_handle_abort_finish_reason`)."""
    await _wait_finished(job)
    aborted = engine_abort(job)
    if aborted is not None:
        return _json(abort_error_body(*aborted), aborted[0])
    return _json(payload())


async def _wait_finished(job: Job) -> None:
    try:
        async for _ in job.updates():
            pass
    except asyncio.CancelledError:  # handler_cancellation: the client went away
        _client_gone(job)
        raise


@contextlib.contextmanager
def _client_watch(job: Job) -> Iterator[None]:
    """A stream whose client went away (a failed write, or the handler cancelled): the
    engine aborts its request after disconnect_abort_delay, as SGLang does."""
    try:
        yield
    except (ConnectionError, asyncio.CancelledError) as exc:
        _client_gone(job)
        if isinstance(exc, asyncio.CancelledError):
            raise


def _client_gone(job: Job) -> None:
    if job.client_gone_at is None:
        job.client_gone_at = time.monotonic()


def create_app(settings: SimSettings | None = None) -> web.Application:
    """The simulator as an aiohttp application (for in-process tests and the CLI)."""
    settings = settings or SimSettings()
    server = SimServer(settings)
    middlewares = [_errors]
    if settings.api_key is not None or settings.admin_api_key is not None:
        # As SGLang: the key middleware exists only when a key is configured.
        keys = (settings.api_key, settings.admin_api_key)
        api_key, admin_key = (k.get_secret_value() if k else None for k in keys)
        middlewares.insert(0, _api_key_middleware(api_key, admin_key))
    # SGLang's CORSMiddleware: always on, every origin, credentials (http_server.py).
    cors = Cors(frozenset({"*"}), credentials=True)
    middlewares.insert(0, _preflight(cors))
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app.on_response_prepare.append(on_prepare(cors))
    app[SIM_KEY] = server
    app.cleanup_ctx.append(server.lifecycle)
    app.on_shutdown.append(server.on_shutdown)
    r = app.router
    # SGLang's public API: the endpoint table the gateway reads too (openapi/endpoints.py),
    # each row served by the handler named after its kind.
    extra = ExtraRoutes(server.tokenizer, settings.context_length)
    for endpoint in ROUTES:
        name = endpoint.kind.replace("-", "_")
        handler = getattr(extra, name, None) or getattr(server, name)
        for method in endpoint.methods:
            r.add_route(method, endpoint.path, handler)
    # No GET /ready: it came in SGLang 0.5.23 (http_server.py `ready`); 0.5.19, the
    # pinned version, answers it 404 like any unknown path.
    for path in ("/server_info", "/get_server_info"):
        r.add_get(path, server.server_info)
    r.add_get("/v1/models/{model:.+}", server.model)
    r.add_post("/pause_generation", server.pause_generation)
    r.add_post("/continue_generation", server.continue_generation)
    r.add_route("GET", "/flush_cache", server.flush_cache)
    r.add_route("POST", "/flush_cache", server.flush_cache)
    r.add_get("/metrics", server.metrics_endpoint)
    for method in ("GET", "POST", "DELETE"):
        r.add_route(method, "/sim/faults", server.sim_faults)
    return app
