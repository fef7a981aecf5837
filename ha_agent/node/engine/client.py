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
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)


def _summed(metric: str) -> Any:
    """A sample's field: this SGLang metric summed over every label set (modes, DP
    ranks, is_streaming)."""
    return field(default=0.0, metadata={"metric": metric})


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
    # Per decode iteration and per prefill batch (chunk), by the scheduler:
    # python/sglang/srt/managers/scheduler_components/metrics_reporter.py.
    realtime_tokens: float = _summed("sglang:realtime_tokens_total")
    # Only when a request finishes (python/sglang/srt/managers/tokenizer_manager.py).
    generation_tokens: float = _summed("sglang:generation_tokens_total")
    requests: float = _summed("sglang:num_requests_total")
    aborted: float = _summed("sglang:num_aborted_requests_total")
    token_usage: float = _summed("sglang:token_usage")

    @property
    def busy(self) -> bool:
        return self.running + self.queued > 0

    @property
    def work_done(self) -> tuple[float, float, float]:
        """Counters that only the engine's scheduler moves: any rise is progress.
        (Aborts are left out: SGLang counts them when asked, not when done.)"""
        return (self.realtime_tokens, self.generation_tokens, self.requests)


# metric name -> EngineSample field
_SUMMED = {f.metadata["metric"]: f.name for f in fields(EngineSample) if "metric" in f.metadata}


@dataclass(frozen=True)
class CanaryResult:
    """What one canary generation showed: a token came out (ok) or not, and how long."""

    ok: bool
    latency: float
    detail: str
    # No answer within the bound (as opposed to an error answer): behind a saturated
    # batch that is slowness, not a hang, if the engine kept producing meanwhile.
    timed_out: bool = False


def parse_metrics(text: str, at: float, latency: float) -> EngineSample:
    values = dict.fromkeys(_SUMMED.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = _SUMMED.get(sample.name)
            if name is not None:
                values[name] += float(sample.value)
    return EngineSample(at=at, latency=latency, **values)


class EngineClient:
    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        admin_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # The engine's API key (EngineAuthSettings.engine_headers), on every request.
        self.headers = dict(headers or {})
        # On /abort_request: the admin key where the engine has one.
        self.admin_headers = dict(admin_headers if admin_headers is not None else self.headers)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A small private pool: probes must never queue behind each other.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=4), headers=self.headers
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
                await resp.read()
                latency = time.monotonic() - started
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
