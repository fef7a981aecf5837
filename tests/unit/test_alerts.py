"""The alert rules: promtool's checks and unit tests, and the conventions they follow.

promtool comes from Debian's prometheus package (scripts/ensure-test-tools.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "prometheus"
RULES = PROM / "alerts" / "sglang-ha.yaml"
TESTS = sorted((PROM / "tests").glob("*.yaml"))
RUNBOOK = ROOT / "docs" / "runbook.md"


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: run scripts/ensure-test-tools.sh (Debian: prometheus)")
    return subprocess.run(
        [tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_passes_promtool_check() -> None:
    result = promtool("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", TESTS, ids=lambda p: p.name)
def test_rules_pass_their_unit_tests(test_file: Path) -> None:
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_a_changed_rule(tmp_path: Path) -> None:
    """Shortening one `for:` must break the tests (they pin silence before it ends)."""
    shutil.copytree(PROM, tmp_path / "prometheus")
    rules = tmp_path / "prometheus" / "alerts" / "sglang-ha.yaml"
    text = rules.read_text()
    assert text.count("for: 30s") >= 1
    rules.write_text(text.replace("for: 30s", "for: 20s", 1))
    pair_tests = tmp_path / "prometheus" / "tests" / "sglang-ha-test.yaml"
    result = promtool("test", "rules", str(pair_tests))
    assert result.returncode != 0
    assert "SglangHaNoPrimary" in result.stdout + result.stderr


def test_every_rule_follows_the_conventions() -> None:
    anchors = github_anchors(RUNBOOK.read_text())
    rules = alert_rules()
    assert rules, "no alert rules"
    for rule in rules:
        name = rule.get("alert")
        assert name and re.fullmatch(r"SglangHa[A-Z][A-Za-z]+", name), rule
        assert "for" in rule, f"{name}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        notes = rule["annotations"]
        assert notes["summary"] and "{{" not in notes["summary"], f"{name}: summary is static"
        assert "{{" in notes["description"], f"{name}: description is templated"
        assert notes["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no section in docs/runbook.md"
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"


def test_every_alert_is_tested_silent_and_firing() -> None:
    silent: set[str] = set()
    firing: set[str] = set()
    for test_file in TESTS:
        for case in yaml.safe_load(test_file.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - firing == set(), "never tested firing"
    assert names - silent == set(), "never tested silent"


def test_the_required_alerts_exist() -> None:
    names = {r["alert"] for r in alert_rules()}
    required = {
        "SglangHaNoPrimary",  # primary down / no primary
        "SglangHaNoHealthyStandby",
        "SglangHaSplitBrain",  # two nodes claiming primary
        "SglangHaDegradedMode",  # Redis unreachable
        "SglangHaRedisNoMaster",
        "SglangHaFailover",
        "SglangHaRelayErrorRateHigh",
    }
    assert required <= names
