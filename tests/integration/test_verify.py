"""`sglang-ha verify --disruptive` against the live stack, as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.integration


@pytest.mark.slow  # --disruptive fails the primary over and back
def test_verify_checklist_passes_and_restores_the_stack(stack: Stack) -> None:
    stack.wait_stable()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ha_agent.ctl",
            "verify",
            "--project",
            stack.project,
            "--disruptive",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    checks = {c["number"]: c for c in json.loads(result.stdout)}
    assert sorted(checks) == [1, 2, 3, 4, 5, 6, 7, 8, 9], result.stdout
    # The test stack publishes the gateway on loopback, where neither keys nor TLS are
    # required.
    assert checks[8]["status"] == "pass" and "this host" in checks[8]["seen"]
    assert checks[9]["status"] == "pass" and "loopback only" in checks[9]["seen"]
    assert checks[6]["status"] == "skipped" and "no NVIDIA GPU" in checks[6]["seen"]
    failed = [c for c in checks.values() if c["status"] == "fail"]
    assert not failed, json.dumps(failed, indent=1)
    assert result.returncode == 0, result.stderr
    assert "100/100 answers valid" in checks[2]["seen"]
    stack.wait_stable()  # the disruptive checks restored everything


def test_verify_without_the_flag_disturbs_nothing(stack: Stack) -> None:
    primary = stack.wait_stable()
    epoch = (stack.agent_status(primary) or {})["epoch"]
    result = subprocess.run(
        [sys.executable, "-m", "ha_agent.ctl", "verify", "--project", stack.project],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIP  fault injection" in result.stdout and "Run with --disruptive." in result.stdout
    assert (stack.agent_status(primary) or {})["epoch"] == epoch
