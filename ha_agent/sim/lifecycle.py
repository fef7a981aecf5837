"""How the simulated engine ends, as SGLang 0.5.19 does: SIGTERM and the scheduler
watchdog (paths under python/sglang/srt/).

SIGTERM (`managers/tokenizer_manager.py`, `SignalHandler.sigterm_handler` and
`TokenizerManager.sigterm_watchdog`): the handler only sets `gracefully_exit`; the
server keeps accepting requests, `/health` answers 503 (`entrypoints/http_server.py`
`health_generate`). A loop that looks every 5 s notices it, then drains with no
deadline: while requests remain (`rid_to_state`, health checks popped) it sleeps 5 s
and looks again, except that it exits at once when the last `/health` failed
(`server_status == UnHealthy`). Then it asks the schedulers to shut down, waits up to
15 s for them (a hung one never answers), kills the tree and exits 0.

Scheduler watchdog (`utils/watchdog.py` `WatchdogRaw`,
`managers/scheduler_components/invariant_checker.py` `create_scheduler_watchdog`):
active only while a batch is in flight; looks every `watchdog_timeout / 2`; when the
forward count has not moved for `--watchdog-timeout` (300 s) it logs, waits 5 s and
sends SIGQUIT to its parent, whose handler (`running_phase_sigquit_handler`) kills
the whole tree with SIGKILL. A hang that starts while idle is never ended by SGLang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ha_agent.sim.server import SimServer

log = logging.getLogger(__name__)

# tokenizer_manager.py sigterm_watchdog: how long it waits for the schedulers after
# sending ShutdownReq before it kills the tree anyway.
SCHEDULER_SHUTDOWN_WAIT = 15.0
# utils/watchdog.py: the pause between the timeout and the SIGQUIT to the parent.
WATCHDOG_GRACE = 5.0


def exit_process() -> None:
    """The real process's end: aiohttp's own shutdown (SIGINT), which closes the
    listener; no request is left to drain by then."""
    os.kill(os.getpid(), signal.SIGINT)


def kill_tree() -> None:
    """`kill_process_tree(os.getpid())`: SIGKILL, no cleanup (exit 137)."""
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Lifecycle:
    def __init__(
        self,
        server: SimServer,
        exit_now: Callable[[], None] = exit_process,
        kill_now: Callable[[], None] = kill_tree,
    ) -> None:
        self.server = server
        self.exit_now = exit_now
        self.kill_now = kill_now
        self.gracefully_exit = False  # TokenizerManager.gracefully_exit
        self.health_failed = False  # server_status == ServerStatus.UnHealthy
        self.exited = False
        # Whether the `hang` fault struck with a batch in flight: a scheduler stuck
        # while idle never forms one, so SGLang's watchdog stays inactive.
        self.hang_with_batch = False
        self._hang_seen = False

    def note_faults(self) -> None:
        """Called whenever the fault knobs change."""
        hang = self.server.faults.hang
        if hang and not self._hang_seen:
            self.hang_with_batch = bool(self.server.engine.running)
        self._hang_seen = hang
        if not hang:
            self.hang_with_batch = False

    # -- SIGTERM ----------------------------------------------------------------------
    def sigterm_handler(self) -> None:
        log.warning("SIGTERM received. Draining requests and shutting down...")
        self.gracefully_exit = True

    def remaining(self) -> list[str]:
        """`rid_to_state`: every request the tokenizer manager still holds; health
        checks are popped from it when they end, so they are not counted."""
        from ha_agent.sim.scheduler import HEALTH_CHECK_RID_PREFIX

        return [
            rid
            for rid, job in self.server.engine.jobs.items()
            if not rid.startswith(HEALTH_CHECK_RID_PREFIX) and not job.finished
        ]

    async def sigterm_watchdog(self) -> None:
        poll = self.server.settings.sigterm_poll_interval
        # A poll, not an Event: SGLang's up-to-5 s delay in noticing is what we model.
        while not self.gracefully_exit:  # noqa: ASYNC110
            await asyncio.sleep(poll)
        while True:
            remaining = self.remaining()
            if self.health_failed:
                log.error("Signal SIGTERM received while health check failed. Force exiting.")
                break
            log.info(
                "Gracefully exiting... Remaining number of requests %d. Remaining requests %s.",
                len(remaining),
                remaining,
            )
            if not remaining:
                break
            await asyncio.sleep(poll)
        # ShutdownReq to the schedulers; a hung one never acts on it.
        if self.server.faults.hang:
            await asyncio.sleep(SCHEDULER_SHUTDOWN_WAIT)
        self.exited = True
        self.exit_now()

    # -- scheduler watchdog -------------------------------------------------------------
    def _batch_in_flight(self) -> bool:
        """`scheduler.cur_batch_for_debug is not None`."""
        engine = self.server.engine
        if self.server.faults.hang and not self.hang_with_batch:
            return False
        return bool(engine.running) and not engine.paused

    async def scheduler_watchdog(self) -> None:
        timeout = self.server.settings.watchdog_timeout
        if timeout <= 0:  # --watchdog-timeout unset: a no-op watchdog
            return
        engine = self.server.engine
        # create_scheduler_watchdog counts forwards (scheduler.forward_ct), not output:
        # a stalled detokenizer with the scheduler still forwarding is no hang to it.
        last_counter = engine.forward_ct
        last_time = time.monotonic()
        while True:
            now = time.monotonic()
            if self._batch_in_flight():
                if engine.forward_ct == last_counter:
                    if now > last_time + timeout:
                        break
                else:
                    last_counter, last_time = engine.forward_ct, now
            await asyncio.sleep(timeout / 2)
        log.error("Scheduler watchdog timeout (self.watchdog_timeout=%s, self.soft=False)", timeout)
        await asyncio.sleep(min(WATCHDOG_GRACE, timeout))
        log.error("SIGQUIT received. It usually means one child failed.")
        self.exited = True
        self.kill_now()
