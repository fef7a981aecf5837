"""The simulated engine: admission queue, running set, latency model, pause/abort.

Every request runs in its own task, independent of the HTTP handler that reads from it;
so, as on SGLang, a client that goes away does not stop its generation at once: the
disconnect watcher aborts it ``disconnect_abort_delay`` seconds later. Latencies are
asyncio sleeps, cheap on CPU:

* one forward at a time, as SGLang's scheduler loop runs one batch at a time
  (``Scheduler.get_next_batch_to_run``: "Run prefill first if possible"): a prefill
  forward blocks the decode step for its whole length;
* a prefill forward takes (``ttft_base`` + ``prefill_per_token`` x its uncached prompt
  tokens) x slow_factor; the requests admitted since the last forward share it, up to
  ``chunked_prefill_size`` tokens (a longer prompt is cut into chunks, one forward each;
  -1 turns chunking off, so one long prompt is one long forward);
* a decode step takes ``itl`` x (1 + ``concurrency_slowdown`` x (running - 1)) x
  slow_factor for the whole running batch: every running stream gets its token at the
  same instant, once per step;
* counters and gauges move when a batch completes, never during a forward
  (``process_batch_result_prefill`` -> ``report_prefill_stats``);
* output reaches clients through a detokenizer stage, which the ``detok_stall`` fault
  knob stops while the scheduler keeps producing;
* at most ``max_running_requests`` run; the rest wait in a FIFO queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ha_agent.config import SimSettings
from ha_agent.sim.faults import Faults, die_of_crash
from ha_agent.sim.generator import Detokenizer, FixedStream, SamplingKey, StopRules, TokenStream
from ha_agent.sim.grammar import Constraint, generate_constrained
from ha_agent.sim.metrics import SchedulerStats, SimMetrics
from ha_agent.sim.prefix_cache import PrefixCache
from ha_agent.sim.reasoning import ThinkMode
from ha_agent.sim.tokenizer import SimTokenizer
from ha_agent.sim.tool_calls import Tool

log = logging.getLogger(__name__)

_POLL = 0.05  # how often a hung or paused request looks again
_WATCH_INTERVAL = 0.1  # disconnect watcher period


class DuplicateRequestId(ValueError):
    pass


class _HttpRequest(Protocol):  # the part of aiohttp's web.Request we use
    @property
    def transport(self) -> asyncio.BaseTransport | None: ...


@dataclass
class GenRequest:
    """One generation, endpoint-agnostic (built by ``protocol``)."""

    prompt_text: str  # the context characters the token stream is keyed on
    prompt_ids: list[int]
    max_new_tokens: int | None  # None: no limit of its own (clip_max_new_tokens bounds it)
    sampling: SamplingKey = field(default_factory=SamplingKey)
    rules: StopRules = field(default_factory=StopRules)
    min_new_tokens: int = 0
    constraint: Constraint | None = None
    rid: str | None = None
    think: ThinkMode | None = None  # a thinking model's start (sim/reasoning.py)
    tools: tuple[Tool, ...] | None = None  # the tools in its prompt (sim/tool_calls.py)
    stream: bool = False  # the metrics' is_streaming label
    log_metrics: bool = True  # False for health checks (GenerateReqInput.log_metrics)


def abort_reason(message: str, status_code: int | None = None) -> dict[str, Any]:
    """SGLang's FINISH_ABORT.to_json() (python/sglang/srt/managers/schedule_batch.py).

    status_code None marks a graceful abort (/abort_request, a client that left); 500 or
    503 an engine-side one, which the HTTP layer turns into an error (tokenizer_manager.py
    _handle_abort_finish_reason, serving_chat.py / serving_completions.py).
    """
    return {"type": "abort", "message": message, "status_code": status_code, "err_type": None}


CLIP_MAX_NEW_TOKENS = 4096  # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION (schedule_policy.py)
NO_LIMIT = 1 << 30
# NewTokenRatioTracker (scheduler_components/new_token_ratio_tracker.py): the share of a
# running request's remaining budget the scheduler still reserves, decaying per decode
# step from SGLANG_INIT_NEW_TOKEN_RATIO to init x SGLANG_MIN_NEW_TOKEN_RATIO_FACTOR over
# SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS, back to init when the scheduler idles.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = INIT_NEW_TOKEN_RATIO * 0.14
NEW_TOKEN_RATIO_DECAY = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"  # python/sglang/srt/constants.py
# ServerArgs.max_prefill_tokens: a prefill batch's token budget when chunking is off
# (the first request is taken whole however long it is: PrefillAdder.add_one_req).
MAX_PREFILL_TOKENS = 16384
QUEUE_FULL_MESSAGE = "The request queue is full."  # Scheduler._abort_on_queued_limit
# SGLANG_FORCE_STREAM_INTERVAL (srt/environ.py): OutputStreamer.accept sends a
# non-streaming request's output on every 50 tokens (and when it finishes).
FORCE_STREAM_INTERVAL = 50


def clip_max_new_tokens(settings: SimSettings, input_len: int, max_new: int | None) -> int:
    """Scheduler.init_req_max_new_tokens (python/sglang/srt/managers/scheduler.py).

    Every request's budget is bounded so that it fits the context and the KV pool
    (max_req_len = min(context_len - 1, max_total_num_tokens - 1), tp_worker.py); a null
    ``max_new_tokens`` means "up to those bounds".
    """
    page = settings.page_size
    max_req_len = min(settings.context_length - 1, settings.max_total_tokens - 1)
    paged_input = -(-input_len // page) * page
    wanted = NO_LIMIT if max_new is None else max_new
    return max(
        0,
        min(
            wanted,
            max_req_len - input_len - 1,
            settings.max_total_tokens - paged_input - page - 1,
        ),
    )


class Job:
    """A request in flight: its generated state plus a change signal for readers."""

    def __init__(
        self,
        rid: str,
        req: GenRequest,
        tokenizer: SimTokenizer,
        eos_rate: float,
        weight_version: str,
    ) -> None:
        self.rid = rid
        self.req = req
        self.weight_version = weight_version
        self.detok = Detokenizer(tokenizer, req.rules)
        self.stream: TokenStream | FixedStream
        if req.constraint is not None:
            material = req.sampling.header() + req.prompt_text.encode("utf-8", "surrogatepass")
            # No further than max_new_tokens can reach (a word token is <= 13 characters).
            budget = None if req.max_new_tokens is None else (req.max_new_tokens + 1) * 16
            text = generate_constrained(req.constraint, material, budget)
            self.stream = FixedStream(tokenizer.encode(text))
        else:
            self.stream = TokenStream(
                tokenizer, req.sampling, req.prompt_text, eos_rate, req.think, req.tools
            )
        self.created = time.time()
        self.created_mono = time.monotonic()
        self.state = "new"  # new -> waiting -> running -> finished
        self.queue_time = 0.0
        self.cached_tokens = 0
        self.prefilled = False
        self.prefill_left = 0  # uncached prompt tokens not yet through a forward
        self.prefill_cached_reported = False
        self._prefill_done: asyncio.Future[None] | None = None
        self.retractions = 0
        self.finish_reason: dict[str, Any] | None = None
        self.e2e_latency: float | None = None
        self.abort_message: str | None = None
        self.force_abort = False
        self.http_request: _HttpRequest | None = None
        self.client_gone_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        # The tokenizer manager's view (what passed the detokenizer): ReqState's
        # ttft_observed, last_completion_tokens and last_time.
        self.delivered_tokens = 0
        self.delivered_at: float | None = None
        self.finish_counted = False
        self.version = 0
        self._changed = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None
        self._admission: asyncio.Future[None] | None = None
        self._enqueued_at = 0.0

    def remaining_estimate(self) -> int:
        """min(max_new_tokens - generated, CLIP): what admission reserves for the rest."""
        assert self.req.max_new_tokens is not None
        return min(max(self.req.max_new_tokens - len(self.output_ids), 0), CLIP_MAX_NEW_TOKENS)

    # -- reader side ----------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def output_ids(self) -> list[int]:
        return self.detok.output_ids

    def meta_info(self) -> dict[str, Any]:
        """SGLang's meta_info (tokenizer_manager._handle_batch_output); queue_time comes
        with --enable-metrics (scheduler time stats)."""
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.req.prompt_ids),
            "weight_version": self.weight_version,
            "num_retractions": self.retractions,
            "reasoning_tokens": 0,  # no reasoning parser here
            "completion_tokens": len(self.detok.output_ids),
            "cached_tokens": self.cached_tokens,
            "queue_time": self.queue_time,
        }
        if self.e2e_latency is not None:
            meta["e2e_latency"] = self.e2e_latency
        return meta

    async def updates(self) -> AsyncIterator[None]:
        """Yield whenever the state changed (coalesced, as SGLang streams the latest)."""
        seen = 0
        while True:
            if self.version != seen:
                seen = self.version
                yield
                if self.finished and seen == self.version:
                    return
                continue
            if self.finished:
                return
            self._changed.clear()
            await self._changed.wait()

    def client_disconnected(self) -> bool:
        req = self.http_request
        if req is None:
            return False
        transport = req.transport
        return transport is None or transport.is_closing()

    # -- engine side ----------------------------------------------------------------
    def notify(self) -> None:
        self.version += 1
        self._changed.set()

    async def sleep(self, delay: float) -> None:
        """Sleep that ``wake()`` (abort) cuts short; no task per sleep, cheap per token."""
        if delay <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(delay, _resolve, fut)
        try:
            await self.wait_on(fut)
        finally:
            handle.cancel()

    async def wait_on(self, fut: asyncio.Future[None]) -> None:
        """Wait for ``fut``, which ``wake()`` (abort) resolves early."""
        self._waiter = fut
        try:
            await fut
        finally:
            self._waiter = None

    def wake(self) -> None:
        _resolve(self._waiter)
        _resolve(self._admission)


def _resolve(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class Engine:
    def __init__(
        self,
        settings: SimSettings,
        tokenizer: SimTokenizer,
        metrics: SimMetrics,
        faults: Faults,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.faults = faults
        self.cache = PrefixCache(settings.max_total_tokens, settings.page_size)
        self.jobs: dict[str, Job] = {}
        self.running: dict[str, Job] = {}
        self.waiting: deque[Job] = deque()
        self.paused = False
        self.pause_mode: str | None = None
        self.shutting_down = False
        self.ready_at = time.monotonic() + settings.startup_delay
        self.last_output_at = 0.0  # TokenizerManager.last_receive_tstamp (monotonic here)
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self._kv_used = 0  # prompt + output tokens of running requests
        self._kv_remaining = 0  # sum of running requests' remaining_estimate()
        self._tasks: set[asyncio.Task[None]] = set()
        self._step_waiters: list[asyncio.Future[None]] = []
        self._prefill_queue: deque[Job] = deque()
        self._forward_loop: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self.forwarding: str | None = None  # "prefill" / "decode" while a forward runs
        self.forward_ct = 0  # Scheduler.forward_ct: forwards launched (the watchdog's counter)
        self.forward_started = 0.0
        self._deferred_health = 0  # Scheduler.return_health_check_ipcs
        self._undelivered: dict[str, Job] = {}  # outputs held by a stalled detokenizer

    # -- status ---------------------------------------------------------------------
    def started(self) -> bool:
        return time.monotonic() >= self.ready_at

    def is_fully_idle(self) -> bool:
        """Scheduler.is_fully_idle(for_health_check=True): nothing running, nothing
        waiting, no batch in flight."""
        return not self.running and not self.waiting and self.forwarding is None

    def stats(self) -> SchedulerStats:
        """Live scheduler state, as published at a log point."""
        used = sum(len(j.req.prompt_ids) + len(j.output_ids) for j in self.running.values())
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_queue_reqs=len(self.waiting),
            num_used_tokens=used,
            max_total_num_tokens=self.settings.max_total_tokens,
            utilization=len(self.running) / self.settings.max_running_requests,
        )

    def render_metrics(self) -> bytes:
        if not self.running and not self.faults.hang:  # the idle scheduler loop
            self.metrics.maybe_idle_log(self.stats())
        return self.metrics.render()

    # -- requests -------------------------------------------------------------------
    def submit(self, req: GenRequest, http_request: _HttpRequest | None = None) -> Job:
        rid = req.rid or uuid.uuid4().hex
        if rid in self.jobs:
            raise DuplicateRequestId(f"Duplicate request ID: {rid}")
        s = self.settings
        req.max_new_tokens = clip_max_new_tokens(s, len(req.prompt_ids), req.max_new_tokens)
        req.min_new_tokens = min(req.min_new_tokens, req.max_new_tokens)
        job = Job(rid, req, self.tokenizer, s.eos_rate, s.weight_version)
        job.http_request = http_request
        self.jobs[rid] = job
        task = asyncio.create_task(self._run(job), name=f"sim-job-{rid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job) -> None:
        try:
            remaining = self.ready_at - time.monotonic()
            if remaining > 0:  # still "loading weights": wait like a warming-up server
                await job.sleep(remaining)
            while self.faults.hang and not job.force_abort:
                await job.sleep(_POLL)  # a hung scheduler does not even take new requests
            await self._admit(job)
            if job.finished:
                return
            await self._prefill(job)
            if job.req.max_new_tokens == 0:  # resolved to an int by submit()
                await self._gate(job)
                self._finish(job, {"type": "length", "length": 0})
            while not job.finished:
                await self._gate(job)
                if job.finished:
                    break
                self._step(job)
                if not job.finished:
                    await self._next_decode_step(job)
        except asyncio.CancelledError:
            self._finish(job, abort_reason("server shutting down"))
            raise
        except Exception:
            log.exception("BUG: simulated generation %s failed", job.rid)
            self._finish(job, abort_reason("internal simulator error"))
        finally:
            self._release(job)

    async def _admit(self, job: Job) -> None:
        job._enqueued_at = time.monotonic()
        if job.abort_message is not None:
            self._finish(job, abort_reason(job.abort_message))
            return
        must_wait = self.paused or self.waiting or not self._fits(job)
        limit = self.settings.max_queued_requests
        if must_wait and limit is not None and len(self.waiting) + 1 > limit:
            # Scheduler._abort_on_queued_limit: the newcomer is refused with 503.
            self._finish(job, abort_reason(QUEUE_FULL_MESSAGE, 503))
            return
        if must_wait:
            job.state = "waiting"
            self.waiting.append(job)
            await self._wait_admission(job)
        else:
            self._start_running(job)

    async def _wait_admission(self, job: Job) -> None:
        job._admission = asyncio.get_running_loop().create_future()
        try:
            await job._admission
        finally:
            job._admission = None

    def _fits(self, job: Job) -> bool:
        """PrefillAdder.add_one_req (python/sglang/srt/managers/schedule_policy.py).

        A request is admitted when a running slot is free and its prompt plus its
        (clipped) budget plus a page fits in what the running requests leave of the KV
        pool: their tokens, and new_token_ratio x their remaining budgets.
        """
        s = self.settings
        if len(self.running) >= s.max_running_requests:
            return False
        rem_total = s.max_total_tokens - self._kv_used - self._kv_remaining * self.new_token_ratio
        need = len(job.req.prompt_ids) + job.remaining_estimate() + s.page_size
        return need < rem_total

    def _start_running(self, job: Job) -> None:
        if job.state != "running":
            job.queue_time += time.monotonic() - job._enqueued_at
            if job.req.log_metrics:
                self.metrics.queue_time.observe(job.queue_time)
        job.state = "running"
        self.running[job.rid] = job
        self._kv_used += len(job.req.prompt_ids) + len(job.output_ids)
        self._kv_remaining += job.remaining_estimate()

    def _stop_running(self, job: Job) -> None:
        if self.running.pop(job.rid, None) is not None:
            self._kv_used -= len(job.req.prompt_ids) + len(job.output_ids)
            self._kv_remaining -= job.remaining_estimate()
        if not self.running:
            self.new_token_ratio = INIT_NEW_TOKEN_RATIO  # reset when idle

    def _drain(self) -> None:
        while self.waiting and not self.paused and not self.faults.hang:
            job = self.waiting[0]
            if not self._fits(job):
                return  # FIFO: the head waits for room, the rest wait behind it
            self.waiting.popleft()
            self._start_running(job)
            _resolve(job._admission)

    async def _prefill(self, job: Job) -> None:
        """Queue the prompt for the forward loop and wait until its last chunk is done."""
        ids = job.req.prompt_ids
        job.cached_tokens = self.cache.match(ids)
        job.prefill_left = len(ids) - job.cached_tokens
        job._prefill_done = asyncio.get_running_loop().create_future()
        self._prefill_queue.append(job)
        self._kick()
        await job.wait_on(job._prefill_done)
        if job.prefill_left > 0:  # woken by an abort before its prefill ended
            return
        self.cache.insert(ids)
        job.prefilled = True

    # -- the forward loop: one batch at a time -------------------------------------
    def _kick(self) -> None:
        self._work.set()
        if self._forward_loop is None or self._forward_loop.done():
            self._forward_loop = asyncio.create_task(self._run_forwards(), name="sim-forwards")

    async def _run_forwards(self) -> None:
        """Scheduler.event_loop_normal: prefill first if there is one, else a decode step."""
        while True:
            await self._while_hung()  # a hung scheduler runs nothing
            batch = self._prefill_batch()
            if batch:
                await self._prefill_forward(batch)
            elif self._step_waiters:
                await self._decode_forward()
            else:
                self._send_health_signals()  # Scheduler.on_idle: no batch to run
                self._work.clear()
                await self._work.wait()

    def _prefill_batch(self) -> list[tuple[Job, int]]:
        """PrefillAdder (schedule_policy.py): the queued prompts, in order, up to
        chunked_prefill_size tokens; a prompt that does not fit is cut (a chunk) and
        ends the batch. With chunking off the first prompt is taken whole and others
        join while the batch stays within max_prefill_tokens."""
        chunk = self.settings.chunked_prefill_size
        budget = chunk if chunk > 0 else MAX_PREFILL_TOKENS
        batch: list[tuple[Job, int]] = []
        tokens = 0
        for job in list(self._prefill_queue):
            if job.finished or job.abort_message is not None:
                self._prefill_queue.remove(job)
                continue
            if job.state != "running":  # retracted: back in the waiting queue
                continue
            room = budget - tokens
            if chunk > 0:
                take = min(job.prefill_left, room)
                if take <= 0 and job.prefill_left > 0:
                    break
            else:
                if batch and job.prefill_left > room:
                    break
                take = job.prefill_left
            batch.append((job, take))
            tokens += take
            if take < job.prefill_left or tokens >= budget:
                break
        return batch

    async def _prefill_forward(self, batch: list[tuple[Job, int]]) -> None:
        for job, _ in batch:
            if self.faults.kills(job.req.prompt_text):
                die_of_crash()
        s = self.settings
        computed = sum(take for _, take in batch)
        await self._forward(
            "prefill", (s.ttft_base + s.prefill_per_token * computed) * self.faults.slow_factor
        )
        cached = 0
        for job, take in batch:
            if not job.prefill_cached_reported:
                job.prefill_cached_reported = True
                cached += job.cached_tokens
            job.prefill_left -= take
            if job.prefill_left <= 0:
                if job in self._prefill_queue:
                    self._prefill_queue.remove(job)
                _resolve(job._prefill_done)
        # process_batch_result_prefill -> report_prefill_stats: only now, at the end.
        self.metrics.on_prefill(computed, cached, self.stats())
        self._send_health_signals(one=True)

    async def _decode_forward(self) -> None:
        await self._forward("decode", self._itl())
        waiters, self._step_waiters = self._step_waiters, []
        for fut in waiters:
            _resolve(fut)
        self._send_health_signals(one=True)

    async def _forward(self, kind: str, seconds: float) -> None:
        """One batch on the device: nothing else runs meanwhile. A hang that starts
        during it holds the result back (the scheduler never gets to process it)."""
        self.forwarding, self.forward_started = kind, time.monotonic()
        self.forward_ct += 1  # Scheduler.run_batch counts the forward at its launch
        try:
            await asyncio.sleep(max(seconds, 0.0))
            await self._while_hung()
        finally:
            self.forwarding = None

    async def _while_hung(self) -> None:
        while True:
            if not self.faults.hang:
                return
            await asyncio.sleep(_POLL)

    def health_check(self) -> bool:
        """A /health request reaching the scheduler (process_input_requests): while it
        is busy the check is not queued but answered after the next batch result (or
        from on_idle), without the detokenizer. True: deferred; False: run it."""
        if self.is_fully_idle():
            return False
        self._deferred_health += 1
        return True

    def _send_health_signals(self, one: bool = False) -> None:
        """maybe_send_health_check_signal: a HealthCheckOutput straight to the tokenizer
        manager, which only bumps last_receive_tstamp (one per batch result). A paused
        scheduler loops without reaching either (event_loop_normal)."""
        if self._deferred_health and not self.paused:
            self._deferred_health = self._deferred_health - 1 if one else 0
            self.last_output_at = time.monotonic()

    async def _gate(self, job: Job) -> None:
        """Hold a request while the engine is hung, paused in place, or it was retracted."""
        while True:
            if self.faults.hang and not job.force_abort:
                await job.sleep(_POLL)  # a hung scheduler does not even process aborts
                continue
            if job.abort_message is not None:
                self._finish(job, abort_reason(job.abort_message))
                return
            if job.state == "waiting":  # retracted by /pause_generation mode=retract
                await self._wait_admission(job)
                continue
            if self.paused and self.pause_mode == "in_place":
                await job.sleep(_POLL)
                continue
            return

    async def _next_decode_step(self, job: Job) -> None:
        """Wait for the end of the batch's next decode step.

        SGLang decodes every running request in one forward pass and sends that step's
        tokens on together (scheduler -> detokenizer -> tokenizer manager as one batch
        output, ``OutputStreamer.stream_output`` in scheduler_components/output_streamer.py),
        so the streams of a batch get their tokens in one burst per step, not each on its
        own clock; a request that joins mid-step gets its next token when the step in
        progress ends.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._step_waiters.append(fut)
        self._kick()
        await job.wait_on(fut)

    def _itl(self) -> float:
        s = self.settings
        running = max(1, len(self.running))
        return s.itl * (1 + s.concurrency_slowdown * (running - 1)) * self.faults.slow_factor

    def _step(self, job: Job) -> None:
        req = job.req
        allow_eos = not req.rules.ignore_eos and len(job.output_ids) >= req.min_new_tokens
        token = job.stream.next_token(allow_eos)
        assert req.max_new_tokens is not None  # resolved by submit()
        before = job.remaining_estimate()
        finish = job.detok.push(token, req.max_new_tokens)
        if job.state == "running":
            self._kv_used += 1
            self._kv_remaining += job.remaining_estimate() - before
        running = max(1, len(self.running))
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY / running
        )
        if finish is None:
            finish = self._engine_abort(job)
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
        job.last_token_at = now
        if self.metrics.on_decode_token(len(self.running)):
            self.metrics.decode_log(self.stats())
        if finish is not None:
            self._finish(job, finish)
        elif req.stream or len(job.output_ids) % FORCE_STREAM_INTERVAL == 0:
            self._deliver(job)
        if self.waiting:  # the scheduler tries to admit at every iteration
            self._drain()

    def _engine_abort(self, job: Job) -> dict[str, Any] | None:
        """Fault knob ``abort_after_tokens``: the engine ends the request itself."""
        n = self.faults.abort_after_tokens
        if n <= 0 or len(job.output_ids) < n:
            return None
        status, message = self.faults.engine_abort()
        return abort_reason(message, status)

    def _finish(self, job: Job, reason: dict[str, Any]) -> None:
        if job.finished:
            return
        job.finish_reason = reason
        job.e2e_latency = time.time() - job.created
        self._deliver(job)

    def _deliver(self, job: Job) -> None:
        """The detokenizer hands the job's latest output to the tokenizer manager, which
        observes TTFT / inter-token latency per output received and counts the request
        when it finishes (TokenizerManager.handle_loop -> collect_metrics); a stalled
        detokenizer holds it back, however much the scheduler produces meanwhile."""
        if self.faults.detok_stall:
            self._undelivered[job.rid] = job
            return
        self._undelivered.pop(job.rid, None)
        now = time.monotonic()
        self.last_output_at = now  # TokenizerManager.last_receive_tstamp
        req = job.req
        n = len(job.output_ids)
        if req.log_metrics:
            if job.delivered_at is None:
                if n or job.finished:
                    self.metrics.first_token(now - job.created_mono, req.stream)
                    job.delivered_at, job.delivered_tokens = now, n
            elif n > job.delivered_tokens:
                self.metrics.inter_tokens(now - job.delivered_at, n - job.delivered_tokens)
                job.delivered_at, job.delivered_tokens = now, n
        if job.finished and not job.finish_counted:
            job.finish_counted = True
            job.e2e_latency = time.time() - job.created
            if req.log_metrics:  # TokenizerManager.collect_metrics, at the request's end
                self.metrics.finished(
                    prompt=len(req.prompt_ids),
                    completion=n,
                    cached=job.cached_tokens,
                    e2e=job.e2e_latency,
                    stream=req.stream,
                )
        job.notify()

    def flush_detokenizer(self) -> None:
        """The stall cleared: the held outputs go out, each as its latest state."""
        if self.faults.detok_stall:
            return
        for job in list(self._undelivered.values()):
            self._deliver(job)

    def _release(self, job: Job) -> None:
        if not job.finished:
            self._finish(job, abort_reason("internal simulator error"))
        job.state = "finished"
        self._stop_running(job)
        if job in self.waiting:
            self.waiting.remove(job)
        if job in self._prefill_queue:
            self._prefill_queue.remove(job)
        self.jobs.pop(job.rid, None)
        if job.prefilled:
            self.cache.insert(job.req.prompt_ids + job.output_ids)
        self._drain()

    # -- control --------------------------------------------------------------------
    def abort(self, rid: str = "", abort_all: bool = False, message: str = "") -> int:
        """Abort one request by id, or all; returns how many were in flight."""
        if abort_all:
            targets = list(self.jobs.values())
        elif rid and rid in self.jobs:
            targets = [self.jobs[rid]]
        else:
            return 0
        # TokenizerManager.abort_request counts the call, not the requests it ends.
        self.metrics.num_aborted_requests.inc()
        for job in targets:
            self._abort_job(job, message or "aborted by /abort_request")
        return len(targets)

    def _abort_job(self, job: Job, message: str, force: bool = False) -> None:
        if job.finished:
            return
        job.force_abort = job.force_abort or force
        if job.abort_message is None:
            job.abort_message = message
        if job.state == "waiting" and (not self.faults.hang or force):
            self.waiting.remove(job)
            job.state = "finished"
            self._finish(job, abort_reason(message))
        job.wake()

    def pause(self, mode: str) -> None:
        self.paused = True
        self.pause_mode = mode
        if mode == "abort":
            self.metrics.num_aborted_requests.inc()  # abort_request(abort_all=True)
            for job in list(self.jobs.values()):
                self._abort_job(job, "aborted by /pause_generation (mode=abort)")
        elif mode == "retract":
            now = time.monotonic()
            for job in reversed(list(self.running.values())):
                self._stop_running(job)
                job.state = "waiting"
                job.retractions += 1
                job._enqueued_at = now
                self.waiting.appendleft(job)

    def resume(self) -> None:
        self.paused = False
        self.pause_mode = None
        self._drain()

    def flush_cache(self) -> bool:
        """SGLang refuses to flush while requests run or wait."""
        if self.running or self.waiting:
            return False
        self.cache.flush()
        return True

    async def watch_disconnects(self) -> None:
        """Abort requests whose client went away, after the configured delay."""
        delay = self.settings.disconnect_abort_delay
        while True:
            await asyncio.sleep(_WATCH_INTERVAL)
            if self._undelivered:
                self.flush_detokenizer()
            now = time.monotonic()
            for job in list(self.jobs.values()):
                if job.client_gone_at is None and job.client_disconnected():
                    job.client_gone_at = now
                if (
                    job.client_gone_at is not None
                    and now - job.client_gone_at >= delay
                    and job.abort_message is None
                ):
                    self.metrics.num_aborted_requests.inc()  # abort_request(rid)
                    self._abort_job(job, "client disconnected")

    async def shutdown(self, grace: float) -> None:
        """Drain for up to ``grace`` seconds, then abort what is left (hung ones included)."""
        self.shutting_down = True
        tasks = list(self._tasks)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for job in list(self.jobs.values()):
            self._abort_job(job, "server shutting down", force=True)
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._forward_loop is not None:
            self._forward_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._forward_loop
