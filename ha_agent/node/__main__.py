"""`sglang-ha-agent`: the HA agent beside one engine (run by supervisord)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import warnings

from ha_agent.config import AgentSettings
from ha_agent.logsetup import configure_loop, install_uvloop, setup
from ha_agent.node.agent import NodeAgent

log = logging.getLogger("ha_agent.node")


def load_settings() -> AgentSettings:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = AgentSettings()
    for w in caught:
        log.warning("config: %s", w.message)
    host = socket.gethostname()
    if settings.advertise_engine_url is None:
        port = settings.engine_url.rsplit(":", 1)[-1].split("/")[0]
        settings.advertise_engine_url = f"http://{host}:{port}"
    if settings.advertise_api_url is None:
        settings.advertise_api_url = f"http://{host}:{settings.api_port}"
    return settings


async def serve(settings: AgentSettings, supervised: bool) -> None:
    configure_loop(asyncio.get_running_loop())
    agent = NodeAgent(settings, supervised)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await agent.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-ha-agent", description=__doc__)
    parser.add_argument(
        "--validate-config", action="store_true", help="print the effective settings and exit"
    )
    args = parser.parse_args(argv)
    setup("agent")
    try:
        settings = load_settings()
    except Exception as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.validate_config:
        print(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))
        return 0
    install_uvloop()
    supervised = bool(settings.supervisor_socket and os.path.exists(settings.supervisor_socket))
    asyncio.run(serve(settings, supervised))
    return 0


if __name__ == "__main__":
    sys.exit(main())
