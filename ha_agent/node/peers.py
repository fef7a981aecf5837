"""Talking to the other nodes' agents: their status, and failsafe acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from ha_agent.dcs.base import AgentStatus
from ha_agent.resolver import CachingResolver

RETRY_PAUSE = 0.05


class PeerClient:
    def __init__(
        self, timeout: float, admin_token: str | None, ack_budget: float | None = None
    ) -> None:
        self.timeout = timeout
        self.ack_budget = timeout if ack_budget is None else ack_budget
        self._headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=8, use_dns_cache=False, resolver=CachingResolver()
                ),
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=self.timeout),
            )
        return self._session

    async def status(self, api_url: str) -> AgentStatus | None:
        """The peer's /ha/status, or None if it does not answer in time (or not
        with a status)."""
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with self._http().get(f"{api_url.rstrip('/')}/ha/status") as resp:
                if resp.status == 200:
                    return AgentStatus.from_json(await resp.json())
        return None

    async def failsafe_ack(self, api_url: str, node: str, epoch: int) -> bool:
        """Ask a peer to acknowledge us as primary while the store is away.

        A peer that answers refuses or grants at once. One that does not answer is
        asked again until `ack_budget` is spent: a single lost answer (a pooled
        connection the peer's restart left dead, a peer slowed by a busy host) must
        not fence a healthy primary whose lease has no slack left to wait a cycle.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_budget
        while True:
            remaining = deadline - loop.time()
            try:
                async with self._http().post(
                    f"{api_url.rstrip('/')}/ha/failsafe",
                    json={"leader": node, "epoch": epoch},
                    headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=max(min(self.timeout, remaining), 0.05)),
                ) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                if deadline - loop.time() < RETRY_PAUSE * 2:
                    return False
                await asyncio.sleep(RETRY_PAUSE)

    async def post(
        self, api_url: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        try:
            async with self._http().post(
                f"{api_url.rstrip('/')}{path}", json=body, headers=self._headers
            ) as resp:
                try:
                    data = await resp.json()
                except (aiohttp.ContentTypeError, ValueError):
                    data = {"detail": await resp.text()}
                return resp.status, data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return 0, {"detail": f"{type(exc).__name__}: {exc}"}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
