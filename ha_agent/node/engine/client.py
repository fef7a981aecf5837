"""HTTP probes of one SGLang engine: a metrics read, a canary generation, an abort.

Why metrics first: SGLang's own /health submits a generation every call, and
timed-out ones are never cancelled (sglang#35884); /metrics costs the scheduler
nothing. A canary runs only when real traffic does not already prove progress,
one at a time, and is aborted by its rid when it times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)


def _summed(metric: str, mode: str | None = None) -> Any:
    """A sample's field: this SGLang metric summed over every label set (DP ranks,
    is_streaming), or over those with this ``mode`` label only."""
    return field(default=0.0, metadata={"metric": metric, "mode": mode})


class EngineUnreachable(Exception):
    """Nothing listens (connection refused): the engine is down or not yet up."""


class EngineTimeout(Exception):
    """The engine accepted the connection but did not answer in time."""


class EngineBadAnswer(Exception):
    """The engine answered with an error status or garbage."""


@dataclass(frozen=True)
class EngineSample:
    """The few numbers health needs, read from one /metrics scrape."""

    # Which of these SGLang 0.5.19 moves when: docs/architecture.md ("Engine health").
    at: float
    latency: float
    running: float = _summed("sglang:num_running_reqs")
    queued: float = _summed("sglang:num_queue_reqs")
    # Produced: at the end of each decode iteration and each prefill forward (chunk),
    # by the scheduler (srt/managers/scheduler_components/metrics_reporter.py).
    prefill_tokens: float = _summed("sglang:realtime_tokens_total", "prefill_compute")
    prefill_cached: float = _summed("sglang:realtime_tokens_total", "prefill_cache")
    decode_tokens: float = _summed("sglang:realtime_tokens_total", "decode")
    # Delivered: what reached the tokenizer manager past the detokenizer
    # (srt/managers/tokenizer_manager.py collect_metrics): the first token, every later
    # token (the inter-token histogram counts tokens), and each request at its end.
    first_tokens: float = _summed("sglang:time_to_first_token_seconds_count")
    later_tokens: float = _summed("sglang:inter_token_latency_seconds_count")
    generation_tokens: float = _summed("sglang:generation_tokens_total")
    requests: float = _summed("sglang:num_requests_total")
    aborted: float = _summed("sglang:num_aborted_requests_total")
    token_usage: float = _summed("sglang:token_usage")

    @property
    def busy(self) -> bool:
        return self.running + self.queued > 0

    @property
    def realtime_tokens(self) -> float:
        return self.prefill_tokens + self.prefill_cached + self.decode_tokens

    @property
    def delivered(self) -> float:
        """Tokens and finished requests that reached the tokenizer manager: what clients
        see. (Aborts are left out: SGLang counts them when asked, not when done.)"""
        return self.first_tokens + self.later_tokens + self.generation_tokens + self.requests

    @property
    def work_done(self) -> tuple[float, ...]:
        """Every counter the engine moves as it works (produced and delivered); any of
        them going back means a new engine run."""
        return (
            self.prefill_tokens,
            self.prefill_cached,
            self.decode_tokens,
            self.first_tokens,
            self.later_tokens,
            self.generation_tokens,
            self.requests,
        )


# metric name -> [(mode label or None, EngineSample field)]
_SUMMED: dict[str, list[tuple[str | None, str]]] = {}
for _f in fields(EngineSample):
    if "metric" in _f.metadata:
        _SUMMED.setdefault(_f.metadata["metric"], []).append((_f.metadata["mode"], _f.name))


@dataclass(frozen=True)
class CanaryResult:
    """What one canary generation showed: a token came out (ok) or not, and how long."""

    ok: bool
    latency: float
    detail: str
    # No answer within the bound (as opposed to an error answer): behind a saturated
    # batch that is slowness, not a hang, if the engine kept producing meanwhile.
    timed_out: bool = False
    # Refused because the waiting queue is full (--max-queued-requests): overload. The
    # refusal comes from the scheduler's input loop, so the scheduler is running.
    overloaded: bool = False


# Scheduler._abort_on_queued_limit (srt/managers/scheduler.py), answered with 503.
QUEUE_FULL = "queue is full"


@dataclass(frozen=True)
class ForwardLimits:
    """What bounds one forward pass, from the engine's /server_info."""

    chunked_prefill_size: int | None  # None or <= 0: chunking off
    max_input_tokens: int | None  # the longest prompt the engine accepts

    @property
    def max_forward_tokens(self) -> int | None:
        """Most prompt tokens one prefill forward can hold: a chunk, or with chunking
        off the longest prompt (PrefillAdder takes a first request whole)."""
        if self.chunked_prefill_size is not None and self.chunked_prefill_size > 0:
            return self.chunked_prefill_size
        return self.max_input_tokens


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_metrics(text: str, at: float, latency: float) -> EngineSample:
    values = {name: 0.0 for wanted in _SUMMED.values() for _, name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for mode, name in _SUMMED.get(sample.name, ()):
                if mode is None or sample.labels.get("mode") == mode:
                    values[name] += float(sample.value)
    return EngineSample(at=at, latency=latency, **values)


class EngineClient:
    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        admin_headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_timeout: float = 4.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Idle pooled connections close before the engine's own timeout (uvicorn's 5 s),
        # so a probe never goes out on one the engine is closing.
        self.keepalive_timeout = keepalive_timeout
        # Verifies an https engine (EngineTLSSettings.engine_ssl_context); None: the
        # system's CAs, verification on all the same.
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        # The engine's API key (EngineAuthSettings.engine_headers), on every request.
        self.headers = dict(headers or {})
        # On /abort_request: the admin key where the engine has one.
        self.admin_headers = dict(admin_headers if admin_headers is not None else self.headers)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A small private pool: probes must never queue behind each other.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=4, ssl=self.ssl, keepalive_timeout=self.keepalive_timeout
                ),
                headers=self.headers,
            )
        return self._session

    async def scrape(self, timeout: float) -> EngineSample:
        started = time.monotonic()
        try:
            async with self._http().get(
                f"{self.base_url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status != 200:
                    raise EngineBadAnswer(f"/metrics answered {resp.status}")
                text = await resp.text()
        except aiohttp.ClientConnectorError as exc:
            raise EngineUnreachable(str(exc)) from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise EngineTimeout(f"/metrics timed out after {timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise EngineBadAnswer(f"/metrics: {type(exc).__name__}: {exc}") from exc
        now = time.monotonic()
        try:
            return parse_metrics(text, at=now, latency=now - started)
        except ValueError as exc:
            raise EngineBadAnswer(f"/metrics unparsable: {exc}") from exc

    async def canary(self, timeout: float) -> CanaryResult:
        """One bounded 1-token generation, aborted on the engine if it times out."""
        rid = f"HA_CANARY_{uuid.uuid4().hex}"
        body = {
            "input_ids": [0],
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "rid": rid,
        }
        started = time.monotonic()
        try:
            async with self._http().post(
                f"{self.base_url}/generate", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                answer = await resp.read()
                latency = time.monotonic() - started
                text = answer.decode("utf-8", "replace").lower()
                if resp.status == 503 and QUEUE_FULL in text:
                    return CanaryResult(
                        False, latency, "canary refused: queue full", overloaded=True
                    )
                if resp.status != 200:
                    return CanaryResult(False, latency, f"canary answered HTTP {resp.status}")
                return CanaryResult(True, latency, "canary generated a token")
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            await self.abort(rid)
            return CanaryResult(
                False,
                time.monotonic() - started,
                f"canary timed out after {timeout:g}s",
                timed_out=True,
            )
        except aiohttp.ClientError as exc:
            return CanaryResult(
                False, time.monotonic() - started, f"canary failed: {type(exc).__name__}"
            )

    async def forward_limits(self, timeout: float) -> ForwardLimits | None:
        """chunked_prefill_size and the longest prompt from /server_info (SGLang's
        resolved server args plus scheduler info, max_req_input_len); None if it does
        not answer in time or says neither. It asks the scheduler too, so call it on a
        healthy engine."""
        try:
            async with self._http().get(
                f"{self.base_url}/server_info", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status != 200:
                    return None
                info = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        if not isinstance(info, dict):
            return None
        chunk = _positive_int(info.get("chunked_prefill_size"))
        longest = _positive_int(info.get("max_req_input_len")) or _positive_int(
            info.get("context_length")
        )
        if chunk is None and longest is None:
            return None
        return ForwardLimits(chunk, longest)

    async def abort(self, rid: str) -> None:
        # Best effort and short: a frozen engine will not answer this either.
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self._http().post(
                f"{self.base_url}/abort_request",
                json={"rid": rid},
                headers=self.admin_headers,
                timeout=aiohttp.ClientTimeout(total=1.0),
            ) as resp:
                await resp.read()
                if resp.status == 401:
                    # Loud: the probe stays queued on the engine, and they pile up.
                    log.error(
                        "engine refused the abort of canary %s with 401: it runs with"
                        " --admin-api-key, which admin routes require; give the agent"
                        " HA_ENGINE_ADMIN_API_KEY_FILE",
                        rid,
                    )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
