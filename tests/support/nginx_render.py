"""Where the gateway's Nginx renderer (`ha_agent.gateway.edge.nginx_conf.main`) reads and
writes, pointed at a test's temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "nginx" / "nginx.conf.template"


def render_into(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> Path:
    """The template in, every file the renderer writes under `tmp_path`, then `env`;
    returns the rendered nginx.conf's path."""
    conf = tmp_path / "nginx.conf"
    for name, value in {
        "NGINX_TEMPLATE": str(TEMPLATE),
        "NGINX_CONF": str(conf),
        "HA_NGINX_BACKUP_FILE": str(tmp_path / "backup.conf"),
        "HA_NGINX_RELAY_FILE": str(tmp_path / "relay.conf"),
        "HA_NGINX_CLIENT_KEYS_FILE": str(tmp_path / "client-keys.conf"),
        **env,
    }.items():
        monkeypatch.setenv(name, value)
    return conf
