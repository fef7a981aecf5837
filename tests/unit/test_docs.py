"""Generated docs stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from ha_agent.config_docs import render

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_up_to_date() -> None:
    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == render(), "run: python -m ha_agent.config_docs > docs/configuration.md"


def test_every_setting_in_compose_env_is_documented() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    for env_file in (ROOT / "compose" / "env").glob("*.env"):
        for line in env_file.read_text().splitlines():
            if line.startswith("HA_"):
                name = line.split("=", 1)[0]
                assert f"`{name}`" in documented, f"{name} from {env_file.name} is undocumented"
