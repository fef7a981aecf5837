"""Upstream HTTP to the engines, and the one classification the retry policy needs.

After aiohttp's client_exceptions: a failure either happened before the engine
could have answered anything (retry it elsewhere), or after the response started
(a stream must be migrated, or ended cleanly).
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from ha_agent.resolver import CachingResolver

# Statuses that mean "this node could not serve it", never "the request is bad".
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})

# Hop-by-hop and length headers are the proxy's own business (RFC 9110 §7.6.1).
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
        "accept-encoding",
        # A client's credentials are not the engines': the relay presents the
        # engines' API key itself (Transport), so an OpenAI SDK's placeholder
        # key never reaches SGLang's --api-key check.
        "authorization",
        # The client's key as our Nginx passes it to the relay (client_keys.py).
        "x-sglang-ha-client-authorization",
        # How long Nginx took to receive the request (policy.py): ours, not an engine's.
        "x-sglang-ha-body-seconds",
    }
)


class FailureCause(enum.Enum):
    """What went wrong with an attempt: what the retry label, the query-of-death
    rule and the migration read (the reason is for people, not for code)."""

    CONNECT = "connect"  # no connection: refused, unreachable, connect timed out
    TIMEOUT = "timeout"  # no answer in time
    CLOSED = "closed"  # the connection closed or failed before the response began
    BROKEN = "broken"  # the response body broke off
    TRUNCATED = "truncated"  # the body ended cleanly, before the stream's [DONE]
    ABANDONED = "abandoned"  # the topology judged the node failed while it held it
    HTTP = "http"  # the engine answered a retryable status
    CONTINUATION_REFUSED = "continuation_refused"  # a stream's next segment refused
    ENGINE_ABORT = "engine_abort"  # the engine ended the stream on its own fault
    OTHER = "other"


class UpstreamFailure(Exception):
    """This attempt failed before the response started; another node may serve it."""

    def __init__(
        self, reason: str, cause: FailureCause = FailureCause.OTHER, connect: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.connect = connect  # nothing reached the node at all


def forward_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in _HOP:
            out.add(key, value)
    return out


def response_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in _HOP and key.lower() != "content-encoding":
            out.add(key, value)
    return out


def classify(exc: BaseException) -> UpstreamFailure:
    """Map a client exception raised before the response started."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(
            f"connect failed: {exc.os_error or exc}", FailureCause.CONNECT, connect=True
        )
    if isinstance(exc, aiohttp.ServerTimeoutError):
        connect = "connect" in str(exc).lower()
        return UpstreamFailure(f"timed out: {exc}", FailureCause.TIMEOUT, connect=connect)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamFailure("timed out before the first byte", FailureCause.TIMEOUT)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamFailure("connection closed before the response", FailureCause.CLOSED)
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure(f"response body broken: {exc}", FailureCause.BROKEN)
    if isinstance(exc, (aiohttp.ClientOSError, ConnectionError, OSError)):
        return UpstreamFailure(f"connection error: {exc}", FailureCause.CLOSED)
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamFailure(f"{type(exc).__name__}: {exc}")
    raise exc


class Transport:
    """One pooled client session for all engines (keep-alive, no total timeout:
    generations are long; stalls are caught by the topology instead)."""

    def __init__(
        self,
        connect_timeout: float,
        first_byte_timeout: float,
        headers: Mapping[str, str] | None = None,
        admin_headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_timeout: float = 4.0,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.first_byte_timeout = first_byte_timeout
        # Sent on every upstream request, relayed or warming: the engines' API key
        # (RelaySettings.engine_headers). The one place upstream credentials are set.
        self.headers = dict(headers or {})
        # On /abort_request: the engines' admin key where they have one
        # (RelaySettings.engine_admin_headers).
        self.admin_headers = dict(admin_headers if admin_headers is not None else self.headers)
        self._session: aiohttp.ClientSession | None = None
        # Shared with the streaming segments' own connections (passthrough.py).
        self.resolver = CachingResolver()
        # Verifies an engine on an https URL (RelaySettings.engine_ssl_context); None:
        # the system's CAs, verification on all the same. Plain http URLs ignore it.
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.keepalive_timeout = keepalive_timeout

    def upstream_headers(self, client: Mapping[str, str]) -> CIMultiDict[str]:
        """What a request to an engine carries: the client's end-to-end headers, then
        our credentials (for connections made outside the session: passthrough.py)."""
        out = forward_headers(client)
        for key, value in self.headers.items():
            out[key] = value
        return out

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0,
                    # Below the engine's own idle timeout: see engine_keepalive_timeout.
                    keepalive_timeout=self.keepalive_timeout,
                    use_dns_cache=False,  # CachingResolver caches, on its own threads
                    resolver=self.resolver,
                    enable_cleanup_closed=True,
                    ssl=self.ssl,
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=self.connect_timeout,
                    sock_connect=self.connect_timeout,
                    sock_read=None,
                ),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
                headers=self.headers,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
