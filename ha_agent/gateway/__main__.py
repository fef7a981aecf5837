"""`sglang-ha-relay`: the leader-aware relay behind Nginx (run by supervisord)."""

from __future__ import annotations

import sys

from ha_agent import daemon
from ha_agent.config import RelaySettings
from ha_agent.gateway.service import RelayService


def main(argv: list[str] | None = None) -> int:
    return daemon.run("sglang-ha-relay", __doc__, "relay", RelaySettings, RelayService, argv)


if __name__ == "__main__":
    sys.exit(main())
