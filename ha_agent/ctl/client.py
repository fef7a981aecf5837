"""What the CLI knows of the cluster: the store's view plus each agent's own answer.

Like patronictl: state is read from the store (Redis), actions go through the
agents' authenticated REST API. When the store is unreachable, the agents listed in
HA_PEERS (and the local one) are asked directly, and the table says so.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx

from ha_agent.config import AgentSettings
from ha_agent.dcs.base import AgentStatus, Cluster, DCSError, HAEvent, Role
from ha_agent.dcs.redis_sentinel import RedisLeaseStore


@dataclass
class NodeRow:
    name: str
    api_url: str
    status: AgentStatus | None

    @property
    def role(self) -> str:
        return self.status.role.value if self.status else "unreachable"


@dataclass
class ClusterView:
    cluster: Cluster | None
    store_error: str | None
    nodes: list[NodeRow] = field(default_factory=list)

    @property
    def primary(self) -> str | None:
        if self.cluster and self.cluster.leader:
            return self.cluster.leader.node
        claims = [n.name for n in self.nodes if n.status and n.status.role is Role.PRIMARY]
        return claims[0] if len(claims) == 1 else None


class ClusterClient:
    def __init__(self, settings: AgentSettings, token: str | None, timeout: float = 5.0) -> None:
        self.s = settings
        self.token = token
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _store_read(self) -> tuple[Cluster | None, str | None]:
        store = RedisLeaseStore(self.s, retry_timeout=self.s.operator_retry_timeout)
        try:
            return await store.get_cluster(), None
        except DCSError as exc:
            return None, str(exc)
        finally:
            await store.close()

    def view(self) -> ClusterView:
        cluster, error = asyncio.run(self._store_read())
        urls: dict[str, str] = {}
        if cluster is not None:
            urls = {m.name: m.api_url for m in cluster.members}
        else:
            for url in [f"http://127.0.0.1:{self.s.api_port}", *self.s.peers]:
                urls.setdefault(url, url)
        rows = []
        with httpx.Client(timeout=self.timeout) as http:
            for name, url in sorted(urls.items()):
                status = None
                try:
                    r = http.get(f"{url}/ha/status")
                    if r.status_code == 200:
                        status = AgentStatus.from_json(r.json())
                except (httpx.HTTPError, ValueError):
                    status = None
                rows.append(NodeRow(status.node if status else name, url, status))
        return ClusterView(cluster, error, rows)

    def post(
        self,
        api_url: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, Any]]:
        return self._call(
            "POST",
            api_url,
            path,
            json=body or {},
            headers=self._headers(),
            timeout=timeout or self.timeout,
        )

    def get(self, api_url: str, path: str) -> tuple[int, dict[str, Any]]:
        return self._call("GET", api_url, path, timeout=self.timeout)

    @staticmethod
    def _call(method: str, api_url: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """(status, JSON object) of an agent's answer; (0, why) when none came."""
        try:
            r = httpx.request(method, f"{api_url}{path}", **kwargs)
        except httpx.HTTPError as exc:
            return 0, {"detail": f"{api_url} did not answer: {exc}"}
        try:
            data = r.json()
        except ValueError:
            data = {"detail": r.text}
        return r.status_code, data if isinstance(data, dict) else {"detail": data}

    def history(self, count: int) -> list[HAEvent]:
        async def read() -> list[HAEvent]:
            store = RedisLeaseStore(self.s, retry_timeout=self.s.operator_retry_timeout)
            try:
                return await store.history(count)
            finally:
                await store.close()

        return asyncio.run(read())
