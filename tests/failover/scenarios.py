"""The faults, as users meet them, injected into the current primary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.support.stack import Stack


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    inject: Callable[[Stack, str], None]
    heal: Callable[[Stack, str], None]
    # Target: seconds from the fault until new requests succeed again undisturbed.
    target_recovery: float
    # How long the fault lasts before it is healed.
    hold: float = 8.0


def _nothing(stack: Stack, node: str) -> None:
    return None


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in (
        Fault(
            "engine-kill",
            "kill -9 of the engine process (supervisord restarts it)",
            lambda s, n: s.signal_engine(n, "KILL"),
            _nothing,
            target_recovery=3.0,
        ),
        Fault(
            "engine-oom",
            "the engine exits as if OOM-killed (CUDA OOM line, SIGKILL)",
            lambda s, n: s.sim_faults(n, oom=True),
            _nothing,
            target_recovery=3.0,
        ),
        Fault(
            "container-kill",
            "docker kill of the whole node container",
            lambda s, n: s.kill_container(n),
            lambda s, n: s.start_container(n),
            target_recovery=3.0,
        ),
        Fault(
            "container-pause",
            "docker pause: the whole node frozen (freezer cgroup)",
            lambda s, n: s.pause(n),
            lambda s, n: s.unpause(n),
            target_recovery=6.0,
        ),
        Fault(
            "engine-sigstop",
            "SIGSTOP of the engine only (the agent stays up)",
            lambda s, n: s.signal_engine(n, "STOP"),
            lambda s, n: s.signal_engine(n, "CONT"),
            target_recovery=6.0,
        ),
        Fault(
            "nic-down",
            "ip link set eth0 down in the node's network namespace",
            lambda s, n: s.nic(n, "down"),
            lambda s, n: s.nic(n, "up"),
            target_recovery=3.0,
        ),
        Fault(
            "engine-hang",
            "generation hangs; /health has no answer for 20 s, then 503 (simulator knob)",
            lambda s, n: s.sim_faults(n, hang=True),
            lambda s, n: s.sim_faults(n),
            target_recovery=6.0,
        ),
        Fault(
            "engine-500",
            "the engine answers every generation with HTTP 500 (simulator knob)",
            lambda s, n: s.sim_faults(n, error_rate=1.0),
            lambda s, n: s.sim_faults(n),
            target_recovery=6.0,
        ),
    )
}
