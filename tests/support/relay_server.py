"""The relay's data port for tests, served as the gateway serves it (data_port.py)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import BaseTestServer

from ha_agent.gateway.stream.data_port import DataPort
from ha_agent.gateway.stream.relay import Relay


class RelayTestServer(BaseTestServer):
    """A test server running `data_port.server()` in a ServerRunner, as service.py does
    (aiohttp's RawTestServer would build its own web.Server from the handler alone)."""

    def __init__(self, port: DataPort, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_port = port

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        return web.ServerRunner(self.data_port.server(), handle_signals=False)


def relay_server(relay: Relay, max_body: int | None = None) -> RelayTestServer:
    """A test server for `relay`'s data port: its handler, hooks and options, as the
    gateway's; `max_body` to lower the body limit."""
    port = relay.data_port()
    if max_body is not None:
        port.max_body = max_body
    return RelayTestServer(port)
