"""What the CLI knows of the cluster: the store's view plus each agent's own answer.

Like patronictl: state is read from the store (Redis), actions go through the
agents' authenticated REST API. When the store is unreachable, the agents listed in
HA_PEERS (and the local one) are asked directly, and the table says so. Each node's
share of traffic comes from the relays' request counters (HA_RELAY_ADMIN_URLS).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

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
class Traffic:
    """What the relays report per node, summed over every relay asked."""

    requests: dict[str, float] = field(default_factory=dict)  # answered, by serving node
    can_serve: dict[str, bool] = field(default_factory=dict)  # in the relays' rotation
    errors: list[str] = field(default_factory=list)  # relays that did not answer

    def share(self, node: str, since: Traffic | None = None) -> tuple[float, float] | None:
        """(requests, fraction of all) for `node`, since `since` when given; None when
        no relay answered or nothing was routed."""
        if not self.requests and self.errors:
            return None

        def routed(name: str) -> float:
            before = since.requests.get(name, 0.0) if since else 0.0
            # A relay restart resets its counters: count from zero again.
            now = self.requests.get(name, 0.0)
            return now - before if now >= before else now

        total = sum(routed(n) for n in self.requests)
        if total <= 0:
            return None
        return routed(node), routed(node) / total


def parse_relay_metrics(text: str, into: Traffic) -> None:
    """Add one relay's per-node request counters and rotation gauges to `into`.
    Requests no node answered (node="-": refused or no node could serve) are not
    anyone's share."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            node = sample.labels.get("node")
            if not node or node == "-":
                continue
            if sample.name == "sglang_ha_relay_requests_total":
                into.requests[node] = into.requests.get(node, 0.0) + sample.value
            elif sample.name == "sglang_ha_relay_node_can_serve":
                # Several relays: in rotation if any of them routes to it.
                into.can_serve[node] = into.can_serve.get(node, False) or sample.value > 0


@dataclass
class ClusterView:
    cluster: Cluster | None
    store_error: str | None
    nodes: list[NodeRow] = field(default_factory=list)
    traffic: Traffic | None = None  # None: no relay to ask (HA_RELAY_ADMIN_URLS empty)

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
            traffic = self._traffic(http) if self.s.relay_admin_urls else None
        return ClusterView(cluster, error, rows, traffic)

    def _traffic(self, http: httpx.Client) -> Traffic:
        traffic = Traffic()
        for url in self.s.relay_admin_urls:
            try:
                r = http.get(f"{url.rstrip('/')}/metrics")
                r.raise_for_status()
                parse_relay_metrics(r.text, traffic)
            except (httpx.HTTPError, ValueError) as exc:
                traffic.errors.append(f"{url}: {exc}")
        return traffic

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
