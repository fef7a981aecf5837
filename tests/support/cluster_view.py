"""What tests see of a running cluster, whatever runs it: one stack (stack.Stack) or
separate hosts (multihost.MultiHost). Both supply the addresses; the questions
asked of the agents, the relay and the simulator are the same."""

from __future__ import annotations

import ssl
import subprocess
import time
from typing import Any

import httpx


class ClusterView:
    secrets: dict[str, str]
    mode: str = "pair"  # pair | pool, as the stack runs (HA_MODE)

    # -- supplied by the runner of the cluster --------------------------------------------

    @property
    def nodes(self) -> list[str]:
        raise NotImplementedError

    def ip(self, service: str) -> str:
        raise NotImplementedError

    def agent_url(self, node: str) -> str:
        raise NotImplementedError

    def engine_url(self, node: str) -> str:
        raise NotImplementedError

    def node_settled(self, status: dict[str, Any]) -> bool:
        """Whether one agent's /ha/status counts as settled for wait_stable."""
        return bool(status["engine"]["state"] == "healthy")

    def relay_settled(self, relay: dict[str, Any]) -> bool:
        """Whether the relay's view counts as settled for wait_stable."""
        return all(n["can_serve"] for n in relay["nodes"])

    # -- observing ------------------------------------------------------------------------

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets['HA_ADMIN_TOKEN']}"}

    def agent_status(self, node: str, timeout: float = 0.5) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.agent_url(node)}/ha/status", timeout=timeout)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, LookupError, StopIteration):
            return None

    def relay_status(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"http://{self.ip('gateway')}:8002/relay/status", timeout=1)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, LookupError):
            return None

    def primary(self) -> str | None:
        for node in self.nodes:
            status = self.agent_status(node)
            if status and status.get("role") == "primary":
                return node
        return None

    def wait_stable(self, timeout: float = 60.0) -> str:
        """Pair: one primary, every node settled, the relay settled and routing to that
        primary; returns the primary. Pool: every node settled and in the relay's view,
        the relay settled; returns the lease holder if one node says primary, else the
        first node."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            statuses = {n: self.agent_status(n) for n in self.nodes}
            relay = self.relay_status()
            last = (statuses, relay)
            primaries = [n for n, s in statuses.items() if s and s["role"] == "primary"]
            if self.mode == "pool":
                if (
                    all(s and self.node_settled(s) and s.get("serving") for s in statuses.values())
                    and relay
                    and {n["name"] for n in relay["nodes"]} >= set(self.nodes)
                    and self.relay_settled(relay)
                ):
                    return primaries[0] if len(primaries) == 1 else self.nodes[0]
                time.sleep(0.2)
                continue
            if (
                len(primaries) == 1
                and all(s and self.node_settled(s) for s in statuses.values())
                and relay
                and relay["primary"] == primaries[0]
                and self.relay_settled(relay)
            ):
                return primaries[0]
            time.sleep(0.2)
        raise AssertionError(f"cluster not stable after {timeout}s: {last}")

    # -- faults ---------------------------------------------------------------------------

    def sim_faults(self, node: str, **knobs: Any) -> None:
        """Set the simulator's gray-failure knobs on a node's engine; none clears them."""
        headers = {"Authorization": f"Bearer {self.secrets['SIM_ADMIN_TOKEN']}"}
        url = f"{self.engine_url(node)}/sim/faults"
        with httpx.Client(verify=self.engine_verify(), timeout=5) as client:
            if knobs:
                r = client.post(url, json=knobs, headers=headers)
            else:
                r = client.delete(url, headers=headers)
        r.raise_for_status()

    def engine_verify(self) -> ssl.SSLContext | bool:
        """What verifies an engine reached at engine_url (https across hosts)."""
        return True


def set_link(pid: int | str, state: str, gateway: str) -> None:
    """`ip link set eth0 down|up` in the network namespace of process `pid`.

    The kernel drops the default route with the link and does not restore it; a real
    host's network manager does, so "up" puts it back. Without it, lookups of names
    Docker's DNS does not know (a stopped container) hang instead of failing, and
    other hosts, only behind that route, stay out of reach.
    """
    steps = [["link", "set", "eth0", state]]
    if state == "up":
        steps.append(["route", "replace", "default", "via", gateway, "dev", "eth0"])
    for step in steps:
        subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "ip", *step],
            check=True,
            capture_output=True,
            timeout=10,
        )
