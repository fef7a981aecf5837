"""The faults, as users meet them, injected into the current primary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.support.stack import Stack

Action = Callable[[Stack, str], None]


def heals_itself(stack: Stack, node: str) -> None:
    """Nothing to undo: the system restarts what the fault ended."""
    return None


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    inject: Action
    heal: Action
    # Target: seconds from the fault until new requests succeed again undisturbed. A
    # process that is gone is noticed at once; a frozen one only by a timeout (6 s).
    target_recovery: float = 3.0
    # How long the fault lasts before it is healed.
    hold: float = 8.0


def by_name(*faults: Fault) -> dict[str, Fault]:
    return {f.name: f for f in faults}


def engine_signal(sig: str) -> Action:
    return lambda s, n: s.signal_engine(n, sig)


def sim_knobs(**knobs: Any) -> Action:
    """Set the simulator's fault knobs; none clears them."""
    return lambda s, n: s.sim_faults(n, **knobs)


def nic(state: str) -> Action:
    return lambda s, n: s.nic(n, state)


FAULTS: dict[str, Fault] = by_name(
    Fault(
        "engine-kill",
        "kill -9 of the engine process (supervisord restarts it)",
        engine_signal("KILL"),
        heals_itself,
    ),
    Fault(
        "engine-oom",
        "the engine exits as if OOM-killed (CUDA OOM line, SIGKILL)",
        sim_knobs(oom=True),
        heals_itself,
    ),
    Fault(
        "container-kill",
        "docker kill of the whole node container",
        Stack.kill_container,
        Stack.start_container,
    ),
    Fault(
        "container-pause",
        "docker pause: the whole node frozen (freezer cgroup)",
        Stack.pause,
        Stack.unpause,
        target_recovery=6.0,
    ),
    Fault(
        "engine-sigstop",
        "SIGSTOP of the engine only (the agent stays up)",
        engine_signal("STOP"),
        engine_signal("CONT"),
        target_recovery=6.0,
    ),
    Fault(
        "nic-down", "ip link set eth0 down in the node's network namespace", nic("down"), nic("up")
    ),
    Fault(
        "engine-hang",
        "generation hangs; /health has no answer for 20 s, then 503 (simulator knob)",
        sim_knobs(hang=True),
        sim_knobs(),
        target_recovery=6.0,
    ),
    Fault(
        "detok-stall",
        "the detokenizer stalls: the scheduler keeps decoding, no token reaches a client"
        " (simulator knob)",
        sim_knobs(detok_stall=True),
        sim_knobs(),
        target_recovery=6.0,
    ),
    Fault(
        "engine-500",
        "the engine answers every generation with HTTP 500 (simulator knob)",
        sim_knobs(error_rate=1.0),
        sim_knobs(),
        target_recovery=6.0,
    ),
)
