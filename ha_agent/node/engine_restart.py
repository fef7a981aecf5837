"""A hung engine is restarted by its own agent once another node serves.

Why: the agent marks a hung engine `hung` and the role moves, but nothing else ends
the hang (SGLang's scheduler watchdog kills its tree only with a batch in flight,
after --watchdog-timeout), so the pair would run without a standby until an
operator acts. Here the agent kills the engine and has supervisord start a new one.

Rules, checked every `loop_wait`:
- only a `hung` engine (a dead one supervisord restarts by itself), only with an
  `EngineControl` (not in sidecar mode), and not while automatic actions are paused;
- never while this node holds the lease, and only while another node is the primary
  with a healthy engine, as registered in the store and fresh: never the engine of
  the only node that could serve;
- hung (and no attempt made) for `engine_restart_after`, doubled for each restart
  already made within `engine_restart_window` (damping); at most
  `engine_restart_limit` restarts in that window, each bounded by
  `engine_restart_timeout`; then it waits for an operator;
- asked once more just before the kill (a canary now, `HealthMonitor.still_hung`):
  a sick engine's canaries back off, so one that recovered a moment ago can still
  read `hung`, and its restart would cost a GPU host minutes of model loading.
Every attempt is an ENGINE_AUTO_RESTART event in ha.log and the store's history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ha_agent import events as ev
from ha_agent.dcs.base import EngineState, Role
from ha_agent.node.engine_control import EngineControl, EngineControlError
from ha_agent.node.ha import Ha

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    restart: bool
    why: str  # the sentence status shows (empty: nothing to say)
    gave_up: bool = False  # the limit is reached: an operator must act


class EngineRestarter:
    def __init__(
        self,
        ha: Ha,
        control: EngineControl | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ha = ha
        self.control = control
        self.clock = clock
        self._restarts: deque[float] = deque()  # monotonic start of each attempt
        self._cured_verdict: float | None = None  # `since` of the hang last restarted
        self._gave_up_for: float | None = None  # the hang we gave up on (event once)
        # Called with "ok" or "failed" per attempt (the metrics' counter).
        self.observers: list[Callable[[str], None]] = []

    def restarts_in_window(self) -> int:
        horizon = self.clock() - self.ha.s.engine_restart_window
        while self._restarts and self._restarts[0] < horizon:
            self._restarts.popleft()
        return len(self._restarts)

    def decide(self) -> Decision:
        s, ha = self.ha.s, self.ha
        h = ha.engine.health
        if h.state is not EngineState.HUNG or h.since == self._cured_verdict:
            return Decision(False, "")
        if not s.engine_auto_restart:
            return Decision(False, "engine hung; automatic restart is off")
        if self.control is None:
            return Decision(False, "engine hung; not ours to restart (sidecar): restart it there")
        if self.control.busy:  # the operator's restart, under way
            return Decision(False, "engine hung; a restart is already under way")
        if ha.state.paused:
            return Decision(False, "engine hung; automatic actions are paused")
        if ha.state.role is Role.PRIMARY:
            return Decision(False, "engine hung; not restarted while this node holds the lease")
        serving = self._healthy_primary_elsewhere()
        if serving is None:
            return Decision(
                False, "engine hung; not restarted until another node is the healthy primary"
            )
        done = self.restarts_in_window()
        if done >= s.engine_restart_limit:
            return Decision(
                False,
                f"engine hung; gave up: {done} automatic restarts in the last"
                f" {s.engine_restart_window:g}s (restart it by hand)",
                gave_up=True,
            )
        wait = s.engine_restart_after * 2**done
        hung_for = self.clock() - h.since
        # Counted from the last attempt too, so a failed one is not retried at once.
        waited = self.clock() - max([h.since, *self._restarts])
        if waited < wait:
            return Decision(
                False,
                f"engine hung for {hung_for:.0f}s; restart after {wait:g}s ({serving} serves)",
            )
        return Decision(
            True,
            f"engine hung for {hung_for:.0f}s ({h.reason}); {serving} is primary;"
            f" restart {done + 1} of {s.engine_restart_limit} in {s.engine_restart_window:g}s",
        )

    def _healthy_primary_elsewhere(self) -> str | None:
        st = self.ha.state
        member = st.members.get(st.leader) if st.leader else None
        # As fresh as Ha counts a member: a registration not renewed is a node gone.
        fresh = 2 * self.ha.s.loop_wait + 2 * self.ha.s.retry_timeout + 1.0
        if (
            member is None
            or member.name == self.ha.name
            or member.role != Role.PRIMARY.value
            or member.engine_health != EngineState.HEALTHY.value
            or time.time() - member.updated > fresh
        ):
            return None
        return member.name

    async def step(self) -> Decision:
        """Decide once; restart if due. What status shows comes from here too."""
        decision = self.decide()
        self._note(decision)
        if not decision.restart:
            self._maybe_give_up(decision)
            return decision
        assert self.control is not None
        # The verdict may be older than the engine's recovery (canaries back off).
        if not await self.ha.engine.still_hung():
            log.info("engine answered again before its restart; not restarted")
            return Decision(False, "")
        h = self.ha.engine.health
        self._restarts.append(self.clock())
        self.ha.events.emit(ev.ENGINE_AUTO_RESTART, f"{self.ha.name}: {decision.why}")
        try:
            pid = await self.control.kill_and_start(self.ha.s.engine_restart_timeout)
        except EngineControlError as exc:
            self.ha.events.emit(ev.ENGINE_AUTO_RESTART_FAILED, f"{self.ha.name}: {exc}")
            self._observe("failed")
            return decision
        # This verdict is answered; the next hang (a new `since`) is judged afresh.
        self._cured_verdict = h.since
        log.info("engine killed and started again (pid %d); waiting for it to be healthy", pid)
        self._observe("ok")
        self.ha.wake.set()
        return decision

    def _note(self, decision: Decision) -> None:
        self.ha.engine_restarts = self.restarts_in_window()
        self.ha.engine_restart_note = decision.why

    def _maybe_give_up(self, decision: Decision) -> None:
        h = self.ha.engine.health
        if decision.gave_up and self._gave_up_for != h.since:
            self._gave_up_for = h.since
            self.ha.events.emit(ev.ENGINE_AUTO_RESTART_EXHAUSTED, f"{self.ha.name}: {decision.why}")

    def _observe(self, outcome: str) -> None:
        for observe in self.observers:
            observe(outcome)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.step()
            except Exception:
                log.exception("BUG: engine restart check failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.ha.s.loop_wait)
