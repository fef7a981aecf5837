"""`sglang-ha-relay`: the leader-aware relay behind Nginx (run by supervisord);
`sglang-ha-relay-watchdog`: kills a relay worker whose event loop froze."""

from __future__ import annotations

import sys

from ha_agent import daemon
from ha_agent.config import RelaySettings
from ha_agent.gateway.edge.watchdog import WatchdogService
from ha_agent.gateway.service import RelayService


def main(argv: list[str] | None = None) -> int:
    return daemon.run("sglang-ha-relay", __doc__, "relay", RelaySettings, RelayService, argv)


def watchdog(argv: list[str] | None = None) -> int:
    return daemon.run(
        "sglang-ha-relay-watchdog",
        WatchdogService.__doc__,
        "relay-watchdog",
        RelaySettings,
        WatchdogService,
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
