"""Render every setting as Markdown: `python -m ha_agent.config_docs > docs/configuration.md`.

Generated from the settings classes themselves so the reference cannot drift; a
unit test fails when docs/configuration.md is out of date.
"""

from __future__ import annotations

import enum
import sys

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from ha_agent.config import (
    AgentSettings,
    ClientAuthSettings,
    EdgeTlsSettings,
    EngineAuthSettings,
    EngineConnectionSettings,
    EngineHealthSettings,
    EngineRestartSettings,
    EngineTLSSettings,
    FailbackSettings,
    LeaseTiming,
    LoggingSettings,
    ModeSettings,
    PoolSettings,
    RedisSettings,
    RelaySettings,
    SimSettings,
)

SECTIONS: list[tuple[str, type[BaseSettings], str]] = [
    ("Logging (agents, relay)", LoggingSettings, "HA_"),
    ("Mode (agents, relay)", ModeSettings, "HA_"),
    ("Coordination store (agents, relay, CLI)", RedisSettings, "HA_"),
    ("Lease timing (agents)", LeaseTiming, "HA_"),
    ("Engine health (agents)", EngineHealthSettings, "HA_"),
    ("Engine restart (agents)", EngineRestartSettings, "HA_"),
    ("Failback (agents)", FailbackSettings, "HA_"),
    ("Pool membership (agents)", PoolSettings, "HA_"),
    ("Engine API key (agents, relay)", EngineAuthSettings, "HA_"),
    ("Engine connections (agents, relay)", EngineConnectionSettings, "HA_"),
    ("Engine TLS (agents, relay)", EngineTLSSettings, "HA_"),
    ("Agent", AgentSettings, "HA_"),
    ("Client keys (gateway)", ClientAuthSettings, "HA_"),
    ("Relay (gateway)", RelaySettings, "HA_"),
    ("Edge TLS (gateway)", EdgeTlsSettings, "GATEWAY_"),
    ("Simulator (CPU demo and tests only)", SimSettings, "SIM_"),
]


def own_fields(cls: type[BaseSettings]) -> dict[str, FieldInfo]:
    """The fields a class adds, not those it inherits from another settings class."""
    inherited: set[str] = set()
    for base in cls.__mro__[1:]:
        if isinstance(base, type) and issubclass(base, BaseSettings) and base is not BaseSettings:
            inherited |= set(base.model_fields)
    return {k: v for k, v in cls.model_fields.items() if k not in inherited}


def _default(field: FieldInfo) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None or value == []:
        return "—"
    if isinstance(value, list):
        return "`" + ",".join(str(v) for v in value) + "`"
    return f"`{value}`"


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Every setting of every component, generated from `ha_agent/config.py`",
        "(`python -m ha_agent.config_docs`). Set them as environment variables — in",
        "`compose/.env` and `compose/env/*.env` for the stacks. `sglang-ha-agent",
        "--validate-config` and `sglang-ha-relay --validate-config` print the effective",
        "values; the timing rule `loop_wait + 2 × retry_timeout ≤ lease_ttl` is enforced",
        "with a warning.",
        "",
        "Settings marked **dynamic** can also be set cluster-wide, at run time, with",
        "`sglang-ha edit-config` (kept in Redis; see docs/operations.md): a value set there",
        "overrides the environment of every agent and of the relay within one cycle,",
        "without a restart. It is checked against the same types and ranges and against",
        "the timing rule first, and refused (never adjusted) if it breaks one.",
        "",
        "Secrets can come as files instead of environment: with `HA_SECRETS_DIR` set",
        "(`/run/secrets` in the stacks, where compose mounts each service's own), a file",
        "there named like the variable in lower case (`ha_redis_password`,",
        "`ha_sentinel_password`, `ha_admin_token`, `sim_admin_token`) sets it",
        "(docs/security.md).",
        "",
    ]
    for title, cls, prefix in SECTIONS:
        lines += [f"## {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, field in own_fields(cls).items():
            doc = (field.description or "").replace("|", "\\|")
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("dynamic"):
                doc = f"**dynamic** — {doc}"
            lines.append(f"| `{prefix}{name.upper()}` | {_default(field)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render())
