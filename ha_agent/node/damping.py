"""Flap damping: a node whose engine keeps failing is held back from the lease.

Why: a node that crashes every minute and recovers in between would otherwise win
the lease at each recovery and fail again under load. Each failure inside the
window doubles the hold-back, up to a cap; a quiet window forgets the history.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class FlapDamper:
    def __init__(
        self,
        window: float = 300.0,
        free_failures: int = 1,
        base_hold: float = 10.0,
        max_hold: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.free_failures = free_failures
        self.base_hold = base_hold
        self.max_hold = max_hold
        self.clock = clock
        self._failures: deque[float] = deque()

    def record_failure(self) -> None:
        self._failures.append(self.clock())
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = self.clock() - self.window
        while self._failures and self._failures[0] < horizon:
            self._failures.popleft()

    def held_back_for(self) -> float:
        """Seconds this node must still wait before taking the lease (0: free)."""
        self._forget_old()
        extra = len(self._failures) - self.free_failures
        if extra <= 0:
            return 0.0
        hold = min(self.base_hold * 2 ** (extra - 1), self.max_hold)
        return max(self._failures[-1] + hold - self.clock(), 0.0)
