"""Fault knobs that make the simulator fail the way real engines do (gray failures too).

* ``hang``: running and new generations stop producing tokens; health, model info and
  metrics still answer (SGLang issues #4191, #6624). Struck with requests running, it
  ends as SGLang's scheduler watchdog ends it (ha_agent/sim/lifecycle.py).
* ``slow_factor``: multiplies every latency (prefill, decode).
* ``error_rate``: that fraction of generation requests answer HTTP 500. Counter based,
  not random: with 0.25 exactly every fourth request fails.
* ``oom``: print a CUDA OOM line to stderr and SIGKILL this process.
* ``fail_health``: ``/health`` and ``/health_generate`` answer 503.
* ``abort_after_tokens`` (with ``abort_cause``, or ``abort_status`` 503 or 500): the
  engine itself ends every request that reaches that many generated tokens with a
  ``finish_reason`` of type ``abort`` carrying SGLang's status code and message for that
  cause (``ENGINE_ABORTS``); the HTTP layer then answers as SGLang does (an error chunk,
  or an error status). 0 = off.
* ``detok_stall``: the detokenizer stops passing output on. The scheduler keeps
  running (``realtime_tokens_total`` and the gauges keep moving) while no token reaches
  a client and nothing the tokenizer manager counts moves (time to first token,
  inter-token latency, the per-request counters). ``/health`` answers 200 while the
  scheduler is busy (its busy-path signal skips the detokenizer,
  ``Scheduler.maybe_send_health_check_signal``) and 503 when idle. ``false`` releases
  what was held, each stream's latest state at once.
* ``crash_marker``: a query of death. A request whose prompt holds this text makes the
  engine crash when its prefill starts, as a kernel fault does on SGLang: the scheduler
  logs "Scheduler hit an exception" with the CUDA error, its parent's SIGQUIT handler
  kills the whole process tree (``python/sglang/srt/managers/scheduler.py``,
  ``srt/entrypoints/engine.py``), and supervisord restarts the engine. Every connection
  drops at once. The knob is in memory, so the restarted engine has it off. "" = off.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

OOM_LINE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
    "total capacity of 79.19 GiB of which 1.06 GiB is free. Including non-PyTorch memory, "
    "this process has 78.12 GiB memory in use. Of the allocated memory 76.50 GiB is "
    "allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated. If reserved "
    "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF="
    "expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


# SGLang's engine-side aborts after output began, by cause: (status, message).
ENGINE_ABORTS: dict[str, tuple[int, str]] = {
    # scheduler.py _abort_on_running_timeout (SGLANG_REQ_RUNNING_TIMEOUT): the request's
    # own length against the operator's limit.
    "running_timeout": (503, "Request running timeout reached."),
    # schedule_batch.py retract_decode: the last request left does not fit the KV pool
    # alone (the request's size).
    "oom_after_retract": (
        500,
        "Out of memory even after retracting all other requests in the decode batch. "
        "Aborting the last request.",
    ),
    # schedule_batch.py retract_decode: a retracted request's backup did not fit the
    # host pool (the node's memory pressure, not this request).
    "retract_host_pool": (500, "Retraction host KV pool exhausted. Aborting the request."),
}
# abort_cause "" : abort_status picks the cause.
_CAUSE_BY_STATUS = {503: "running_timeout", 500: "oom_after_retract"}


class FaultError(ValueError):
    """A bad knob name or value (the admin endpoint answers 400)."""


@dataclass
class Faults:
    hang: bool = False
    slow_factor: float = 1.0
    error_rate: float = 0.0
    oom: bool = False
    fail_health: bool = False
    abort_after_tokens: int = 0
    abort_status: int = 503
    abort_cause: str = ""
    crash_marker: str = ""
    detok_stall: bool = False

    def __post_init__(self) -> None:
        self._requests_seen = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, patch: Any) -> None:
        """Apply a partial update atomically (validate everything first)."""
        if not isinstance(patch, dict):
            raise FaultError("fault settings must be a JSON object")
        clean: dict[str, Any] = {}
        known = self.as_dict()
        for key, value in patch.items():
            if key not in known:
                raise FaultError(f"unknown fault knob {key!r}; known knobs: {', '.join(known)}")
            if key == "crash_marker":
                if not isinstance(value, str):
                    raise FaultError("crash_marker must be a string")
            elif key == "abort_cause":
                if value != "" and value not in ENGINE_ABORTS:
                    raise FaultError(f"abort_cause must be one of: {', '.join(ENGINE_ABORTS)}")
            elif key in ("hang", "oom", "fail_health", "detok_stall"):
                if not isinstance(value, bool):
                    raise FaultError(f"{key} must be true or false")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise FaultError(f"{key} must be a number")
                value = float(value)
                if key == "slow_factor" and not (0 < value < math.inf):
                    raise FaultError("slow_factor must be a positive number")
                if key == "error_rate" and not 0.0 <= value <= 1.0:
                    raise FaultError("error_rate must be between 0 and 1")
                if key == "abort_after_tokens":
                    if value < 0 or value != int(value):
                        raise FaultError("abort_after_tokens must be a whole number >= 0")
                    value = int(value)
                if key == "abort_status":
                    if value not in (500, 503):
                        raise FaultError("abort_status must be 500 or 503")
                    value = int(value)
            clean[key] = value
        if "error_rate" in clean and clean["error_rate"] != self.error_rate:
            self._requests_seen = 0
        for key, value in clean.items():
            setattr(self, key, value)

    def clear(self) -> None:
        self.update(asdict(Faults()))

    def engine_abort(self) -> tuple[int, str]:
        """(status, message) of the engine-side abort knob ``abort_after_tokens``."""
        return ENGINE_ABORTS[self.abort_cause or _CAUSE_BY_STATUS[int(self.abort_status)]]

    def kills(self, prompt: str) -> bool:
        """Does this prompt trip the query-of-death knob?"""
        return bool(self.crash_marker) and self.crash_marker in prompt

    def next_request_fails(self) -> bool:
        """Deterministic error injection: fail when the running share crosses a whole request."""
        n = self._requests_seen
        self._requests_seen += 1
        rate = self.error_rate
        return rate > 0 and math.floor((n + 1) * rate + 1e-9) > math.floor(n * rate + 1e-9)


def die_of_oom() -> None:
    """Behave like an engine killed by a CUDA OOM: the message, then SIGKILL (exit 137)."""
    log.critical("sglang-ha-sim: simulating a CUDA out-of-memory crash (fault knob 'oom')")
    sys.stderr.write(OOM_LINE + "\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


CRASH_LINES = (
    "Scheduler hit an exception: Traceback (most recent call last):\n"
    "RuntimeError: CUDA error: an illegal memory access was encountered\n"
    "Received sigquit from a child process. It usually means the child failed."
)


def die_of_crash() -> None:
    """Behave like an engine whose scheduler hit a CUDA fault: the lines, then SIGKILL."""
    log.critical("sglang-ha-sim: simulating a scheduler crash (fault knob 'crash_marker')")
    sys.stderr.write(CRASH_LINES + "\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
