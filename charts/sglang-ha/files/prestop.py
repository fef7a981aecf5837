"""preStop of a node's pod: hand the primary role over, then let requests finish.

Runs in the node container with the agent's Python, standard library only:
    prestop.py HANDOVER_SECONDS DRAIN_SECONDS
1. If this node is the primary, ask its agent for a planned switchover (the agent
   picks a healthy standby; the relay moves new requests and broken streams there)
   and wait up to HANDOVER_SECONDS for it to step down.
2. Wait up to DRAIN_SECONDS for the requests still running or queued here to end.
Then Kubernetes sends SIGTERM: supervisord stops the engine (it drains, stopwaitsecs)
and the agent (a primary that is still one releases its lease at once). Every step
is bounded and a failure only shortens the wait: a preStop never blocks the stop.
"""

import json
import sys
import time
import urllib.error
import urllib.request

AGENT = "http://127.0.0.1:8008"
TOKEN_FILE = "/run/secrets/ha_admin_token"


def log(message: str) -> None:
    # The container's stdout is the agent's log stream (kubectl logs).
    print(f"prestop: {message}", flush=True)


def status() -> dict | None:
    try:
        with urllib.request.urlopen(f"{AGENT}/ha/status", timeout=2) as resp:
            return json.load(resp)
    except (OSError, ValueError) as exc:
        log(f"agent status unavailable: {exc}")
        return None


def switchover() -> None:
    with open(TOKEN_FILE, encoding="utf-8") as f:
        token = f.read().strip()
    req = urllib.request.Request(
        f"{AGENT}/ha/switchover?wait=false",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            log(f"switchover requested: {resp.status}")
    except urllib.error.HTTPError as exc:
        # Refused (no healthy standby): stopping still releases the lease.
        log(f"switchover refused: {exc.code} {exc.read()[:200]!r}")
    except OSError as exc:
        log(f"switchover not sent: {exc}")


def wait(what: str, done, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = status()
        if s is not None and done(s):
            return True
        time.sleep(0.5)
    log(f"gave up waiting for {what} after {seconds:g}s")
    return False


def main(handover: float, drain: float) -> None:
    s = status()
    if s is not None and s.get("role") == "primary":
        switchover()
        if wait("the handover", lambda s: s.get("role") != "primary", handover):
            log("stepped down")
    if wait(
        "requests to finish",
        lambda s: s["engine"].get("running", 0) == 0 and s["engine"].get("queued", 0) == 0,
        drain,
    ):
        log("drained")


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]))
