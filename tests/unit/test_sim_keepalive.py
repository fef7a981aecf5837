"""The simulator process closes idle connections as uvicorn under SGLang does
(ha_agent/sim/__main__.py `KeepAlive`; uvicorn's protocols/http/httptools_impl.py
`on_response_complete`): never before a connection's first request, and the keep-alive
timeout after a response."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from tests.support.sim import sim_process

TIMEOUT = 0.5


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closed the connection within `seconds`."""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except asyncio.TimeoutError:
        return False


async def test_an_unused_connection_stays_open_and_a_used_one_closes_after_the_timeout() -> None:
    with sim_process("keepalive", SIM_KEEP_ALIVE_TIMEOUT=str(TIMEOUT)) as sim:
        url = urlsplit(sim.url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            # Four timeouts with nothing sent: still open (uvicorn arms no timer yet).
            assert not await closed_within(reader, 4 * TIMEOUT)
            writer.write(b"GET /health HTTP/1.1\r\nHost: sim\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            answered = time.monotonic()
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), 5)
            assert await closed_within(reader, 10 * TIMEOUT)
            assert time.monotonic() - answered >= TIMEOUT * 0.9
        finally:
            writer.close()


def test_our_idle_engine_connections_close_before_sglangs() -> None:
    """The defaults hold against SGLang's own (SGLANG_TIMEOUT_KEEP_ALIVE, 5 s), as the
    simulator's default stands for it."""
    from ha_agent.config import AgentSettings, RelaySettings, SimSettings

    sglang = SimSettings().keep_alive_timeout
    assert sglang == 5.0
    for settings in (AgentSettings(redis_url="redis://unused"), RelaySettings()):
        assert settings.engine_keepalive_timeout < sglang
