"""Judge the local engine: starting, healthy, hung or dead.

Signals, cheapest first (which hold on real SGLang: docs/architecture.md):
1. The process: supervisord (running? how did it last exit?) and /proc (stopped by
   SIGSTOP? using CPU?).
2. /metrics, every `scrape_interval`. Connection refused means dead. Two kinds of
   counters move, both only when a batch completes: what the scheduler *produced*
   (`sglang:realtime_tokens_total` per mode, at the end of each prefill forward or
   chunk and each decode iteration) and what was *delivered* to the tokenizer
   manager past the detokenizer, i.e. what clients see (the time-to-first-token and
   inter-token histograms' counts, `generation_tokens_total`, `num_requests_total`).
   Progress is delivered progress. Unanswered reads mean frozen when the process uses
   no CPU (or is out of sight); while it keeps using CPU (SGLang tokenizes big prompts
   in its HTTP process) they are tolerated up to `busy_unresponsive_limit`.
3. A canary generation (one token, bounded, aborted on timeout), only when needed:
   to confirm a start or a recovery, when requests are present but nothing was
   delivered for `stall_timeout`, and after `canary_idle` with no progress at all.
   Never more than one in flight. It waits in the same queue as everyone, so a
   timeout is judged by what moved meanwhile: tokens delivered, or a prefill ending
   (a long prompt in chunks), is busy; more tokens decoded since the last delivery
   than a healthy engine holds back (non-streaming output goes out every 50 tokens) is
   an output stall (hung), and counts as requests present even when the gauges say
   idle; nothing at all is a hang only once the engine has been silent longer
   than one forward pass may take: the most prompt tokens a forward can hold (a
   chunk, or the longest prompt with chunking off) at the prefill rate its counters
   have proved (`prefill_rate` at least, `min_forward_allowance` at least). A canary
   sent because requests were present need not time out for that: the silence is
   judged on every read while it waits. A canary refused with "queue is full" is
   overload, not a failure.

Only the canary, the process, an unanswering engine, a silence longer than a forward
or `busy_unresponsive_limit` without any activity can make a healthy engine unhealthy.
What clients send (4xx, garbage, floods) is never an input here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ha_agent.config import EngineHealthSettings
from ha_agent.dcs.base import EngineState, EngineStatus
from ha_agent.node.engine.client import (
    CanaryResult,
    EngineBadAnswer,
    EngineClient,
    EngineSample,
    EngineTimeout,
    EngineUnreachable,
    ForwardLimits,
)
from ha_agent.node.engine.process import ProcessActivity, ProcessState, ProcessWatch

log = logging.getLogger(__name__)

# Share of one core the engine's process must have used while /metrics went
# unanswered to count as busy rather than frozen. Tokenizing uses a whole core; a
# stopped or deadlocked process close to none (its idle event loop well under 1 %).
BUSY_CPU_SHARE = 0.05
# What a canary itself adds to the progress counters (its prompt token's prefill, its
# one token, its request finishing or aborted) and so cannot count as others' progress.
CANARY_OWN_WORK = 4.0
# SGLANG_FORCE_STREAM_INTERVAL (srt/environ.py, used in scheduler_components/
# output_streamer.py): a non-streaming request's output goes to the tokenizer manager
# every 50 tokens, so up to 50 tokens per running request may be decoded and not yet
# delivered on a healthy engine.
DELIVERY_INTERVAL = 50
# The longest forward assumed until the engine's /server_info says: SGLang 0.5.19's
# chunked_prefill_size on an 80 GB-class GPU (srt/arg_groups/memory_hook.py).
DEFAULT_FORWARD_TOKENS = 8192


@dataclass(frozen=True)
class EngineHealth:
    """The monitor's judgement of its engine and the numbers behind it; `status()` is
    what the agent reports of it."""

    state: EngineState
    reason: str
    since: float
    oom: bool = False
    # The engine's own exception ended the run (not a kill, an OOM kill or a hang);
    # `exceptions` counts such runs since the agent started, so a reader that polls
    # sees one even when the engine was restarted between two polls.
    exception: bool = False
    exceptions: int = 0
    # Down, and how the run ended is read for good (ProcessState.final): `exception`
    # false then means a kill, not "not read yet".
    exit_known: bool = False
    running: float = 0.0
    queued: float = 0.0
    token_usage: float = 0.0
    probe_latency: float | None = None
    last_progress_age: float | None = None

    @property
    def healthy(self) -> bool:
        return self.state is EngineState.HEALTHY

    def status(self, now: float) -> EngineStatus:
        """The judgement as the agent reports it to peers, the relay and the CLI."""
        return EngineStatus(
            state=self.state,
            reason=self.reason,
            for_seconds=round(now - self.since, 1),
            oom=self.oom,
            exceptions=self.exceptions,
            exit_known=self.exit_known,
            running=self.running,
            queued=self.queued,
            token_usage=self.token_usage,
        )


Listener = Callable[[EngineHealth, EngineHealth], None]


class HealthMonitor:
    def __init__(
        self,
        settings: EngineHealthSettings,
        client: EngineClient | None = None,
        process: ProcessWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s = settings
        self.client = client or EngineClient(settings.engine_url)
        self.process = process
        self.clock = clock
        now = clock()
        self.health = EngineHealth(EngineState.STARTING, "waiting for the engine", now)
        self._started_at = now  # start of the current engine run (for startup_grace)
        self._last: EngineSample | None = None
        self._last_progress = now  # tokens delivered to clients (or a canary answered)
        self._last_activity = now  # anything moved: produced or delivered
        self._activity_floor = now  # the latest movement happened after this
        self._silent_until: float | None = None  # an excused silence ends here
        self._rate_seen = 0.0  # prefill tokens/s the counters proved, this engine run
        # Tokens decoded since the last delivery: output clients are owed. The scheduler
        # may have finished every request (its gauges say idle) while the clients still
        # wait for all of it behind a stalled detokenizer.
        self._owed = 0.0
        # Requests left the scheduler (its running gauge fell) and nothing reached a
        # client since: their output is owed too. With short requests a stalled
        # detokenizer lets the scheduler finish them all between two publications of
        # its gauges (num_running_reqs every decode_log_interval iterations, while
        # realtime_tokens_total moves every iteration: report_decode_stats), so the
        # slack, sized by a stale running count, can exceed the tokens owed while every
        # client waits.
        self._finished_unseen = False
        self._limits: ForwardLimits | None = None
        self._limits_task: asyncio.Future[ForwardLimits | None] | None = None
        self._timeouts = 0
        self._idle_timeouts = 0  # unanswered reads in a row with the process using no CPU
        self._unanswered_since: float | None = None
        self._excused_at = -1.0  # last time an unanswered read was excused as busy
        self._engine_pid = 0
        # This death's exit (how the process ended) was told: the HTTP probe can see a
        # dead engine a tick before the process watch (a sidecar's Docker read) says
        # how it died, and that later answer is told once too.
        self._exit_told = False
        self._canary: asyncio.Task[CanaryResult] | None = None
        self._canary_failures = 0
        self._canary_behind_work = False  # the canary in flight went out with requests present
        self._canary_sent_at = 0.0
        self._next_canary_at = 0.0
        self._listeners: list[Listener] = []
        self.canary_latency: float | None = None
        # Called with (probe, seconds) for every answered probe (the metrics' histogram).
        self.probe_observers: list[Callable[[str, float], None]] = []
        # (time, ok) of recent canaries: the success rate failback negotiation uses.
        # Our own probes only — a client that hangs up aborts its request too, and a
        # flood of those must not look like a degraded primary.
        self._canaries: collections.deque[tuple[float, bool]] = collections.deque(maxlen=64)

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # -- state changes ---------------------------------------------------------------

    def _set(self, state: EngineState, reason: str, **extra: object) -> None:
        old = self.health
        now = self.clock()
        since = old.since if old.state is state else now
        sample = self._last
        exception = bool(extra.get("exception", False))
        self.health = EngineHealth(
            state=state,
            reason=reason,
            since=since,
            oom=bool(extra.get("oom", False)),
            exception=exception,
            exceptions=old.exceptions + int(exception and not old.exception),
            exit_known=bool(extra.get("exit_known", False)),
            running=sample.running if sample else 0.0,
            queued=sample.queued if sample else 0.0,
            token_usage=sample.token_usage if sample else 0.0,
            probe_latency=sample.latency if sample else None,
            last_progress_age=now - self._last_progress,
        )
        told = state is EngineState.DEAD and bool(extra.get("exit_how")) and not self._exit_told
        self._exit_told = state is EngineState.DEAD and (self._exit_told or told)
        # Why also on `oom` and on the exit told late: the HTTP probe often sees the dead
        # engine before supervisord or the sidecar tells us how it died.
        if old.state is not state or (self.health.oom and not old.oom) or told:
            log.info("engine %s -> %s: %s", old.state.value, state.value, reason)
            for listener in self._listeners:
                listener(old, self.health)

    def _engine_restarted(self) -> None:
        """A new engine run: it must prove itself with a canary again."""
        now = self.clock()
        self._started_at = now
        self._last = None
        self._last_progress = now
        self._last_activity = now
        self._activity_floor = now
        self._silent_until = None
        self._rate_seen = 0.0
        self._owed = 0.0
        self._finished_unseen = False
        self._limits = None
        self._timeouts = 0
        self._idle_timeouts = 0
        self._unanswered_since = None
        self._canary_failures = 0
        self._next_canary_at = 0.0

    # -- one tick ------------------------------------------------------------------------

    async def tick(self) -> EngineHealth:
        now = self.clock()
        if self.process is not None:
            proc = await self._read_process()
            # Alive but stopped (SIGSTOP, a paused container); supervisord's own
            # STOPPED (stopped by an operator) has no pid and is down.
            if proc is not None and proc.state == "STOPPED" and proc.pid:
                self._frozen(f"process {proc.describe()}")
                return self.health
            if proc is not None and not proc.running:
                self._process_down(proc)
                return self.health
            if proc is not None:
                self._engine_pid = proc.pid
        before = self._activity()
        if before is not None and before.stopped:
            self._frozen(f"engine process stopped (state {before.letter}, pid {self._engine_pid})")
            return self.health

        try:
            sample = await self.client.scrape(self.s.scrape_timeout)
        except EngineUnreachable:
            self._not_listening(now)
            return self.health
        except (EngineTimeout, EngineBadAnswer) as exc:
            self._unanswered(now, str(exc), before)
            return self.health
        self._timeouts = self._idle_timeouts = 0
        self._unanswered_since = None
        for observe in self.probe_observers:
            observe("metrics", sample.latency)
        self._observe(sample)
        now = self.clock()
        if (
            self._no_progress_too_long(now)
            or self._silent_too_long(now)
            or self._silent_behind_canary(now)
        ):
            return self.health
        self._maybe_canary(self.clock())
        return self.health

    # -- how long one forward pass may run ------------------------------------------------

    def prefill_rate(self) -> float:
        """Prompt tokens/s: the configured floor, or what the counters proved."""
        return max(self.s.prefill_rate, self._rate_seen)

    def max_forward_tokens(self) -> int:
        if self.s.max_forward_tokens is not None:
            return self.s.max_forward_tokens
        limit = self._limits.max_forward_tokens if self._limits is not None else None
        return limit or DEFAULT_FORWARD_TOKENS

    def forward_allowance(self) -> float:
        """How long one forward pass may keep the engine silent: the most prompt tokens a
        forward can hold at the prefill rate, never less than `min_forward_allowance`.

        Why a forward bounds it: on SGLang every counter the monitor reads moves only
        when a batch completes (`realtime_tokens_total` from `report_prefill_stats` /
        `report_decode_stats`, the tokenizer manager's histograms when that batch's
        output arrives), and the scheduler runs one batch at a time
        (`Scheduler.event_loop_normal`); so with requests present, a silence longer than
        the longest forward it can run is no forward at all."""
        longest = self.max_forward_tokens() / self.prefill_rate()
        return max(longest, self.s.min_forward_allowance)

    def _read_limits(self) -> None:
        """Once per engine run, on a healthy engine: /server_info asks its scheduler."""
        if self.s.max_forward_tokens is not None or self._limits is not None:
            return
        if self._limits_task is not None:
            return
        self._limits_task = asyncio.ensure_future(self.client.forward_limits(self.s.scrape_timeout))
        self._limits_task.add_done_callback(self._limits_read)

    def _limits_read(self, task: asyncio.Future[ForwardLimits | None]) -> None:
        self._limits_task = None
        if task.cancelled() or task.exception() is not None:
            return
        self._limits = task.result()
        if self._limits is not None:
            log.info(
                "engine forward limit: %s prompt tokens (chunked_prefill_size %s)",
                self._limits.max_forward_tokens,
                self._limits.chunked_prefill_size,
            )

    def _silent_too_long(self, now: float) -> bool:
        """An excused silence (a canary timed out with nothing moving, but one forward
        might still be running) that outlasted the allowance is a hang."""
        if self._silent_until is None or self.health.state is not EngineState.HEALTHY:
            return False
        if now < self._silent_until:
            return False
        silent_for = now - self._last_activity
        self._silent_until = None
        self._cancel_canary()
        self._set(
            EngineState.HUNG,
            f"nothing moved for {silent_for:.1f}s, longer than a forward of"
            f" {self.max_forward_tokens()} prompt tokens at {self.prefill_rate():.0f} tokens/s",
        )
        return True

    def _silent_behind_canary(self, now: float) -> bool:
        """Requests were present when the canary went out, and nothing has moved for
        longer than one forward may take: a hang, judged without waiting out the
        canary's own timeout (the common hang, no long prefill in flight, is caught
        one forward allowance after the last movement). Counters moved by a running
        forward's end, a prefill chunk or a decode step reset the silence (`_observe`),
        so a busy engine is never judged here; only an engine whose scheduler
        completes no batch at all with work queued."""
        if self._canary is None or not self._canary_behind_work:
            return False
        if self.health.state is not EngineState.HEALTHY:
            return False
        if self._excused_at > self._canary_sent_at:
            # /metrics went unanswered with the process busy meanwhile (SGLang tokenizes
            # in its HTTP process): the canary's timeout judges, as _excused_timeout does.
            return False
        silent_for = now - self._last_activity
        allowance = self.forward_allowance()
        if silent_for < allowance:
            return False
        waited = now - self._canary_sent_at
        self._cancel_canary()
        self._set(
            EngineState.HUNG,
            f"canary unanswered after {waited:.1f}s and nothing moved for {silent_for:.1f}s"
            f" with requests present, longer than a forward of {self.max_forward_tokens()}"
            f" prompt tokens at {self.prefill_rate():.0f} tokens/s",
        )
        return True

    def _activity(self) -> ProcessActivity | None:
        if self.process is None or not self._engine_pid:
            return None
        return self.process.activity(self._engine_pid)

    def _frozen(self, reason: str) -> None:
        self._cancel_canary()
        if self.health.state is not EngineState.DEAD:
            self._set(EngineState.HUNG, f"frozen: {reason}")

    def _unanswered(self, started: float, error: str, before: ProcessActivity | None) -> None:
        """/metrics timed out or answered garbage: frozen, or only busy?"""
        now = self.clock()
        after = self._activity()
        self._timeouts += 1
        if self._unanswered_since is None:
            self._unanswered_since = started
        unanswered_for = now - self._unanswered_since
        share = None
        if before is not None and after is not None and now > started:
            share = (after.cpu_seconds - before.cpu_seconds) / (now - started)
        if after is not None and after.stopped:
            self._frozen(f"engine process stopped (state {after.letter})")
            return
        if share is not None and share >= BUSY_CPU_SHARE:
            self._idle_timeouts = 0
            self._excused_at = now
            if unanswered_for >= self.s.busy_unresponsive_limit:
                self._cancel_canary()
                self._set(
                    EngineState.HUNG,
                    f"unresponsive for {unanswered_for:.0f}s although busy"
                    f" (process at {share:.0%} CPU): {error}",
                )
            else:
                log.debug("engine slow but busy (%.0f%% CPU): %s", share * 100, error)
            return
        self._idle_timeouts += 1
        if self._idle_timeouts >= self.s.unresponsive_after and self.health.state not in (
            EngineState.DEAD,
            EngineState.HUNG,
        ):
            self._cancel_canary()
            basis = "process not using CPU" if share is not None else "process out of sight"
            self._set(
                EngineState.HUNG,
                f"unresponsive: {error} ({self._idle_timeouts}x in a row, {basis})",
            )

    def _no_progress_too_long(self, now: float) -> bool:
        """The backstop: a healthy engine with no activity at all for the busy bound
        (every canary excused as waiting behind a busy engine) is hung."""
        quiet_for = now - self._last_activity
        if self.health.state is not EngineState.HEALTHY:
            return False
        if quiet_for < self.s.busy_unresponsive_limit:
            return False
        self._cancel_canary()
        self._set(EngineState.HUNG, f"no progress for {quiet_for:.0f}s")
        return True

    async def _read_process(self) -> ProcessState | None:
        assert self.process is not None
        try:
            return await self.process.read(timeout=self.s.scrape_timeout)
        except Exception as exc:  # supervisord away: fall back to HTTP signals only
            log.debug("supervisord unreadable: %s", exc)
            return None

    def _process_down(self, proc: ProcessState) -> None:
        self._cancel_canary()
        self._engine_restarted()
        if proc.state in ("STARTING",) and self.health.state is EngineState.STARTING:
            self._set(EngineState.STARTING, f"process {proc.describe()}")
        else:
            self._set(
                EngineState.DEAD,
                f"process {proc.describe()}",
                oom=proc.oom,
                exception=proc.exception,
                exit_known=proc.final,
                exit_how=proc.exit_how,
            )

    def _not_listening(self, now: float) -> None:
        self._cancel_canary()
        state = self.health.state
        if state is EngineState.STARTING and now - self._started_at < self.s.startup_grace:
            self._set(EngineState.STARTING, "engine not listening yet")
            return
        if state is not EngineState.DEAD:
            self._engine_restarted()
        self._set(
            EngineState.DEAD,
            "engine not listening (connection refused)",
            oom=self.health.oom,
            exception=self.health.exception,
            # Still the death the process watch explained, if it did.
            exit_known=state is EngineState.DEAD and self.health.exit_known,
        )

    def recent_success_rate(self, window: float = 120.0, least: int = 3) -> float | None:
        """Share of this agent's canaries that succeeded over the last `window` s
        (None with fewer than `least` of them)."""
        horizon = self.clock() - window
        recent = [ok for at, ok in self._canaries if at >= horizon]
        if len(recent) < least:
            return None
        return sum(recent) / len(recent)

    def _observe(self, sample: EngineSample) -> None:
        prev, self._last = self._last, sample
        if prev is None:
            return
        done, before = sample.work_done, prev.work_done
        if any(now < then for now, then in zip(done, before, strict=True)):
            # Counters went back: the engine restarted under us.
            self._engine_restarted()
            self._last = sample
            return
        decoded = sample.decode_tokens - prev.decode_tokens
        if sample.delivered != prev.delivered:
            self._last_progress = sample.at
            self._owed = 0.0
            self._finished_unseen = False
        else:
            self._owed += decoded
            if sample.running < prev.running:
                self._finished_unseen = True
            if decoded > 0 and not self._output_stalled(sample):
                # Non-streaming requests are delivered every 50 tokens: decoding within
                # that slack is progress clients will see.
                self._last_progress = sample.at
        moved = sum(done) - sum(before)
        if moved > CANARY_OWN_WORK or (moved > 0 and self._canary is None):
            prefilled = sample.prefill_tokens - prev.prefill_tokens
            if prefilled > 0:
                # The forwards that did this began after the movement seen before, which
                # happened after _activity_floor: a lower bound of the prefill rate.
                took = sample.at - self._activity_floor
                if took > 0:
                    self._rate_seen = max(self._rate_seen, prefilled / took)
            self._activity_floor = prev.at
            self._last_activity = sample.at
            self._silent_until = None

    def _maybe_canary(self, now: float) -> None:
        if self._canary is not None or now < self._next_canary_at:
            return
        state = self.health.state
        sample = self._last
        busy = sample is not None and (
            sample.busy or self._output_stalled(sample) or self._finished_unseen
        )
        quiet_for = now - self._last_progress
        if state is not EngineState.HEALTHY:
            why = "confirm the engine works"
        elif self._silent_until is not None:
            return  # a canary already waited; the allowance decides
        elif busy and quiet_for > self.s.stall_timeout:
            why = f"requests present but no token delivered for {quiet_for:.1f}s"
        elif quiet_for > self.s.canary_idle:
            why = "idle check"
        else:
            if state is EngineState.HEALTHY:
                self._set(EngineState.HEALTHY, self.health.reason)  # refresh numbers
            return
        log.debug("canary: %s", why)
        # Only the gauges count as requests present here: output owed (finished_unseen)
        # also follows every drop of a stale running gauge on an engine gone idle, and
        # there a slow canary must not be judged before its own timeout.
        self._canary_behind_work = (
            sample is not None and sample.busy and state is EngineState.HEALTHY
        )
        self._canary_sent_at = started = now
        before = self._last
        self._canary = asyncio.ensure_future(self.client.canary(self.s.canary_timeout))
        self._canary.add_done_callback(lambda task: self._canary_done(task, why, started, before))

    def _output_stalled(self, sample: EngineSample) -> bool:
        """More tokens decoded since the last delivery than a healthy engine can hold
        back (DELIVERY_INTERVAL per running request): the output path is stuck."""
        slack = DELIVERY_INTERVAL * max(sample.running, 1.0) + CANARY_OWN_WORK
        return self._owed > slack

    def _moved_since(self, before: EngineSample | None) -> tuple[float, float]:
        """(delivered, prefilled) since ``before``."""
        now = self._last
        if before is None or now is None:
            return (0.0, 0.0)
        return (
            now.delivered - before.delivered,
            now.prefill_tokens + now.prefill_cached - before.prefill_tokens - before.prefill_cached,
        )

    def _canary_done(
        self,
        task: asyncio.Task[CanaryResult],
        why: str,
        started: float,
        before: EngineSample | None,
    ) -> None:
        self._canary = None
        if task.cancelled():
            return
        exc = task.exception()
        result = task.result() if exc is None else CanaryResult(False, 0.0, f"canary error: {exc}")
        now = self.clock()
        self.canary_latency = result.latency
        if not result.overloaded:  # a refusal for load says nothing of the engine's health
            self._canaries.append((now, result.ok))
        for observe in self.probe_observers:
            observe("canary", result.latency)
        if result.ok:
            self._canary_failures = 0
            self._last_progress = self._last_activity = now
            self._silent_until = None
            self._set(EngineState.HEALTHY, f"{result.detail} in {result.latency * 1000:.0f} ms")
            self._read_limits()
            return
        if result.overloaded:
            # The scheduler's input loop refused it: running, with a full queue. Load
            # is the relay's to shed; a failover would hand the same load over.
            log.info("%s: overloaded, not hung", result.detail)
            self._next_canary_at = now + self.s.stall_timeout
            return
        healthy = self.health.state is EngineState.HEALTHY
        if result.timed_out and healthy and self._excused_timeout(result, started, before, now):
            return
        self._canary_failures += 1
        # Back off on a sick engine: one probe at a time, and fewer as it stays sick.
        backoff = min(0.5 * 2 ** (self._canary_failures - 1), 5.0)
        self._next_canary_at = now + backoff
        state = self.health.state
        if state is EngineState.STARTING and now - self._started_at < self.s.startup_grace:
            self._set(EngineState.STARTING, f"not ready yet: {result.detail}")
        elif self._canary_failures >= self.s.canary_failures and state is not EngineState.DEAD:
            self._set(EngineState.HUNG, f"{result.detail} ({why}){self._stall_note(before)}")

    def _stall_note(self, before: EngineSample | None) -> str:
        delivered, _ = self._moved_since(before)
        if self._last is not None and self._output_stalled(self._last) and not delivered:
            return f": {self._owed:.0f} tokens decoded, none delivered (output stalled)"
        return ""

    def _excused_timeout(
        self, result: CanaryResult, started: float, before: EngineSample | None, now: float
    ) -> bool:
        """A canary queued behind everyone else timed out on a healthy engine: is that
        slowness (True: not a failure) or a hang?"""
        delivered, prefilled = self._moved_since(before)
        if delivered > CANARY_OWN_WORK or self._excused_at > started:
            # Clients got tokens (a saturated batch), or /metrics went unanswered with
            # the process busy (tokenizing): slowness.
            log.info("%s, but the engine is busy and delivering: not hung", result.detail)
            self._next_canary_at = now + self.s.stall_timeout
            return True
        if self._last is not None and self._output_stalled(self._last):
            return False  # decoded but not delivered: the output path is stuck
        if prefilled > CANARY_OWN_WORK:
            # A long prompt in chunks: decode waits for all of them, nothing is
            # delivered meanwhile; the backstop bounds it.
            log.info("%s, but the engine is prefilling: not hung", result.detail)
            self._next_canary_at = now + self.s.stall_timeout
            return True
        allowance = self.forward_allowance()
        silent_for = now - self._last_activity
        if silent_for >= allowance:
            return False
        # Nothing moved at all: a hang, or one forward pass still running (its counters
        # move only when it ends). Wait out the longest it may take, then judge.
        self._silent_until = self._last_activity + allowance
        log.info(
            "%s with nothing moving for %.1fs: within the %.1fs a forward of %d prompt"
            " tokens may take at %.0f tokens/s",
            result.detail,
            silent_for,
            allowance,
            self.max_forward_tokens(),
            self.prefill_rate(),
        )
        return True

    async def still_hung(self) -> bool:
        """Ask the engine once more, now, before something costly is done about a hang.

        Why: a sick engine's canaries back off (up to 5 s apart), so an engine that
        recovered a moment ago can still read `hung`; restarting it would throw away a
        working engine (on a GPU host, minutes of model loading). Waits for the canary
        in flight, or sends one at once; the verdict is `_canary_done`'s as ever."""
        if self.health.state is not EngineState.HUNG:
            return False
        if self._canary is None:
            self._next_canary_at = 0.0
            self._maybe_canary(self.clock())
        task = self._canary
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=self.s.canary_timeout + 1.0)
        return self.health.state is EngineState.HUNG

    def _cancel_canary(self) -> None:
        if self._canary is not None:
            self._canary.cancel()
            self._canary = None
        self._silent_until = None

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = self.clock()
            try:
                await self.tick()
            except Exception:
                log.exception("BUG: engine health tick failed")
            delay = max(self.s.scrape_interval - (self.clock() - started), 0.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        self._cancel_canary()
        if self._limits_task is not None:
            self._limits_task.cancel()
        await self.client.close()
