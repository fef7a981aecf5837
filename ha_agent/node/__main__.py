"""`sglang-ha-agent`: the HA agent beside one engine (run by supervisord)."""

from __future__ import annotations

import os
import socket
import sys

from ha_agent import daemon
from ha_agent.config import AgentSettings
from ha_agent.node.agent import NodeAgent


def load_settings() -> AgentSettings:
    """AgentSettings with the advertised URLs defaulting to this host's name."""
    settings = AgentSettings()
    host = socket.gethostname()
    if settings.advertise_engine_url is None:
        # Same scheme as the agent's own: an engine serving TLS serves nothing else.
        scheme = "https" if settings.engine_url.startswith("https:") else "http"
        port = settings.engine_url.rsplit(":", 1)[-1].split("/")[0]
        settings.advertise_engine_url = f"{scheme}://{host}:{port}"
    if settings.advertise_api_url is None:
        settings.advertise_api_url = f"http://{host}:{settings.api_port}"
    return settings


def _agent(settings: AgentSettings) -> NodeAgent:
    supervised = bool(settings.supervisor_socket and os.path.exists(settings.supervisor_socket))
    return NodeAgent(settings, supervised)


def main(argv: list[str] | None = None) -> int:
    return daemon.run("sglang-ha-agent", __doc__, "agent", load_settings, _agent, argv)


if __name__ == "__main__":
    sys.exit(main())
