"""`sglang-ha-relay`: the leader-aware relay behind Nginx (run by supervisord)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import warnings

from ha_agent.config import RelaySettings
from ha_agent.gateway.service import RelayService
from ha_agent.logsetup import configure_loop, install_uvloop, setup

log = logging.getLogger("ha_agent.gateway")


async def serve(settings: RelaySettings) -> None:
    configure_loop(asyncio.get_running_loop())
    service = RelayService(settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sglang-ha-relay", description=__doc__)
    parser.add_argument(
        "--validate-config", action="store_true", help="print the effective settings and exit"
    )
    args = parser.parse_args(argv)
    setup("relay")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            settings = RelaySettings()
        except Exception as exc:
            print(f"invalid configuration: {exc}", file=sys.stderr)
            return 2
    for w in caught:
        log.warning("config: %s", w.message)
    if args.validate_config:
        print(json.dumps(settings.model_dump(mode="json"), indent=2, default=str))
        return 0
    install_uvloop()
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
