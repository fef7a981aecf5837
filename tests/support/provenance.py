"""Which code a measurement ran: every bench result and failover report names it."""

from __future__ import annotations

import subprocess

# The trees whose changes alter what is measured; docs edited during a run do not.
CODE_PATHS = ("ha_agent", "bench", "tests", "nginx", "images", "compose", "scripts", "Dockerfile")


def run_text(*args: str) -> str:
    """A command's stdout, stripped; empty when it cannot run (no git, no docker)."""
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
        return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def commit() -> str:
    """The checkout's commit, marked "+changes" when tracked code or images differ from it."""
    head = run_text("git", "rev-parse", "--short=7", "HEAD") or "unknown"
    dirty = run_text("git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return f"{head}+changes" if dirty else head
