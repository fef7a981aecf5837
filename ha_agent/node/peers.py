"""Talking to the other nodes' agents: their status, and failsafe acknowledgements."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp

from ha_agent.resolver import CachingResolver


class PeerClient:
    def __init__(self, timeout: float, admin_token: str | None) -> None:
        self.timeout = timeout
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

    async def status(self, api_url: str) -> dict[str, Any] | None:
        """The peer's /ha/status, or None if it does not answer in time."""
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with self._http().get(f"{api_url.rstrip('/')}/ha/status") as resp:
                if resp.status == 200:
                    data: dict[str, Any] = await resp.json()
                    return data
        return None

    async def failsafe_ack(self, api_url: str, node: str, epoch: int) -> bool:
        """Ask a peer to acknowledge us as primary while the store is away."""
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with self._http().post(
                f"{api_url.rstrip('/')}/ha/failsafe",
                json={"leader": node, "epoch": epoch},
                headers=self._headers,
            ) as resp:
                return resp.status == 200
        return False

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
