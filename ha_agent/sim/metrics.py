"""Prometheus metrics under SGLang's names, in a registry of the simulator's own.

Names, label (``model_name``) and histogram buckets follow SGLang's
``python/sglang/srt/metrics/collector.py``. One deliberate difference, so progress is
visible while requests run: ``sglang:generation_tokens_total`` grows per generated token
(SGLang adds a request's tokens when it finishes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
E2E_BUCKETS = (*TTFT_BUCKETS, 600, 1200, 1800, 2400)
ITL_BUCKETS = (
    0.002,
    0.004,
    0.006,
    0.008,
    0.010,
    0.015,
    0.020,
    0.025,
    0.030,
    0.035,
    0.040,
    0.060,
    0.080,
    0.100,
    0.200,
    0.400,
    0.600,
    0.800,
    1.0,
    2.0,
    4.0,
    6.0,
    8.0,
)
QUEUE_BUCKETS = (0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)


@dataclass
class EngineSnapshot:
    """Gauge values, read from the scheduler when /metrics is scraped."""

    num_running_reqs: int
    num_queue_reqs: int
    num_used_tokens: int
    max_total_num_tokens: int
    gen_throughput: float
    cache_hit_rate: float
    utilization: float


class ThroughputWindow:
    """Tokens per second over the last few seconds, in fixed buckets (O(1) per token)."""

    def __init__(self, width: float = 0.5, buckets: int = 10) -> None:
        self._width = width
        self._n = buckets
        self._counts = [0] * buckets
        self._slots = [-1] * buckets

    def add(self, n: int = 1, now: float | None = None) -> None:
        slot = int((time.monotonic() if now is None else now) / self._width)
        i = slot % self._n
        if self._slots[i] != slot:
            self._slots[i], self._counts[i] = slot, 0
        self._counts[i] += n

    def rate(self, now: float | None = None) -> float:
        slot = int((time.monotonic() if now is None else now) / self._width)
        # Complete buckets only: the current one is still filling.
        total = sum(
            c for s, c in zip(self._slots, self._counts, strict=True) if slot - self._n < s < slot
        )
        return total / ((self._n - 1) * self._width)


class SimMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        reg, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=reg, buckets=buckets).labels(model_name)

        self.num_running_reqs = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge(
            "sglang:num_queue_reqs", "The number of requests in the waiting queue."
        )
        self.gen_throughput = gauge("sglang:gen_throughput", "The generation throughput (token/s).")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.token_usage = gauge("sglang:token_usage", "The token usage.")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "The number of used tokens.")
        self.max_total_num_tokens = gauge(
            "sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool."
        )
        self.utilization = gauge(
            "sglang:utilization", "Running requests as a fraction of max_running_requests."
        )
        self.prompt_tokens = counter(
            "sglang:prompt_tokens_total", "Number of prefill tokens processed."
        )
        self.generation_tokens = counter(
            "sglang:generation_tokens_total", "Number of generation tokens processed."
        )
        self.cached_tokens = counter(
            "sglang:cached_tokens_total", "Number of cached prompt tokens."
        )
        self.num_requests = counter("sglang:num_requests_total", "Number of requests processed.")
        self.num_aborted_requests = counter(
            "sglang:num_aborted_requests_total", "Number of requests aborted."
        )
        self.ttft = histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e = histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            E2E_BUCKETS,
        )
        self.queue_time = histogram(
            "sglang:queue_time_seconds",
            "Histogram of queueing time in seconds.",
            QUEUE_BUCKETS,
        )

    def render(self, snap: EngineSnapshot) -> bytes:
        self.num_running_reqs.set(snap.num_running_reqs)
        self.num_queue_reqs.set(snap.num_queue_reqs)
        self.num_used_tokens.set(snap.num_used_tokens)
        self.max_total_num_tokens.set(snap.max_total_num_tokens)
        self.token_usage.set(snap.num_used_tokens / max(1, snap.max_total_num_tokens))
        self.gen_throughput.set(snap.gen_throughput)
        self.cache_hit_rate.set(snap.cache_hit_rate)
        self.utilization.set(snap.utilization)
        return generate_latest(self.registry)
