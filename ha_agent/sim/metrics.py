"""Prometheus metrics under SGLang's names, labels and update rules.

Two collectors, as in SGLang (``python/sglang/srt/observability/metrics_collector.py``):

* the **tokenizer** side (labels ``model_name``, ``engine_type``) counts a request when
  it *finishes* (``TokenizerManager.collect_metrics`` -> ``observe_one_finished_request``):
  ``prompt_tokens_total``, ``generation_tokens_total`` and ``num_requests_total`` (with
  ``is_streaming``) jump by the request's whole count at its end, never per token;
  ``num_aborted_requests_total`` grows per ``/abort_request`` call (``abort_request``);
* the **scheduler** side (labels ``model_name``, ``engine_type``, ``tp_rank``,
  ``pp_rank``, ``moe_ep_rank``; ``srt/managers/scheduler_components/metrics_reporter.py``)
  counts ``sglang:realtime_tokens_total{mode=prefill_compute|prefill_cache|decode}`` at
  every prefill batch and every decode iteration, and publishes its gauges
  (``num_running_reqs``, ``num_queue_reqs``, ``token_usage``, ``gen_throughput``, ...)
  only at a prefill batch, every ``decode_log_interval`` decode iterations, and when the
  scheduler is idle with a stale gauge (``_maybe_log_idle_metrics``). Between those the
  gauges hold their last value; a hung scheduler publishes nothing.
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
QUEUE_BUCKETS = (
    0.0,
    0.001,
    0.005,
    0.010,
    0.050,
    0.100,
    0.200,
    0.500,
    1,
    2,
    3,
    4,
    5,
    10,
    15,
    20,
    30,
    40,
    50,
    60,
    70,
    80,
    90,
    100,
    200,
    300,
    400,
    500,
    600,
    700,
    800,
    900,
    1000,
    1200,
    1400,
    1600,
    1800,
    2000,
    2500,
    3000,
)
IDLE_REPUBLISH = 30.0  # _maybe_log_idle_metrics: republish when idle this long


@dataclass
class SchedulerStats:
    """What the scheduler publishes at a log point (SGLang's ``SchedulerStats``)."""

    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_used_tokens: int = 0
    max_total_num_tokens: int = 0
    gen_throughput: float = 0.0
    cache_hit_rate: float = 0.0
    utilization: float = 0.0


def _streaming(stream: bool) -> str:
    return "true" if stream else "false"


class SimMetrics:
    def __init__(self, model_name: str, decode_log_interval: int = 40) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.tok_labels = {"model_name": model_name, "engine_type": "unified"}
        self.sched_labels = {
            **self.tok_labels,
            "tp_rank": "0",
            "pp_rank": "0",
            "moe_ep_rank": "0",
        }
        tok, sched = list(self.tok_labels), list(self.sched_labels)
        self.decode_log_interval = decode_log_interval

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, sched, registry=reg).labels(**self.sched_labels)

        # -- scheduler side ---------------------------------------------------------
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
        self.realtime_tokens = Counter(
            "sglang:realtime_tokens_total",
            "Total number of tokens processed (updated on each log interval). "
            "mode: prefill_compute, prefill_cache, decode.",
            [*sched, "mode"],
            registry=reg,
        )
        self.queue_time = Histogram(
            "sglang:queue_time_seconds",
            "Histogram of queueing time in seconds.",
            sched,
            registry=reg,
            buckets=QUEUE_BUCKETS,
        ).labels(**self.sched_labels)

        # -- tokenizer side ---------------------------------------------------------
        self.prompt_tokens = Counter(
            "sglang:prompt_tokens_total",
            "Number of prefill tokens processed.",
            [*tok, "is_streaming"],
            registry=reg,
        )
        self.generation_tokens = Counter(
            "sglang:generation_tokens_total",
            "Number of generation tokens processed.",
            [*tok, "is_streaming"],
            registry=reg,
        )
        self.cached_tokens = Counter(
            "sglang:cached_tokens_total",
            "Number of cached prompt tokens.",
            [*tok, "cache_source"],
            registry=reg,
        )
        self.num_requests = Counter(
            "sglang:num_requests_total",
            "Number of requests processed.",
            [*tok, "is_streaming"],
            registry=reg,
        )
        self.num_aborted_requests = Counter(
            "sglang:num_aborted_requests_total", "Number of requests aborted.", tok, registry=reg
        ).labels(**self.tok_labels)
        self.ttft = Histogram(
            "sglang:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            [*tok, "is_streaming"],
            registry=reg,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "sglang:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            tok,
            registry=reg,
            buckets=ITL_BUCKETS,
        ).labels(**self.tok_labels)
        self.e2e = Histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of End-to-end request latency in seconds",
            [*tok, "is_streaming"],
            registry=reg,
            buckets=E2E_BUCKETS,
        )

        # -- the scheduler's log-interval state (MetricsReporter) -------------------
        self.forward_ct_decode = 0.0  # decode iterations (fractional: see on_decode_token)
        self._next_decode_log = float(decode_log_interval)
        self._generated_since_log = 0
        self._last_decode_log = time.perf_counter()
        self.last_log_time = 0.0  # never: the first idle look publishes
        self.published = SchedulerStats()

    # -- scheduler events -----------------------------------------------------------
    def on_prefill(self, computed: int, cached: int, stats: SchedulerStats) -> None:
        """``report_prefill_stats``: realtime prefill tokens, then publish the gauges."""
        self._realtime("prefill_compute", computed)
        self._realtime("prefill_cache", cached)
        total = computed + cached
        stats.cache_hit_rate = cached / total if total else 0.0
        stats.gen_throughput = self.published.gen_throughput  # prefill does not set it
        self.publish(stats)

    def on_decode_token(self, running: int) -> bool:
        """One request's decode step (``report_decode_stats``, per request of the batch).

        SGLang decodes the whole running batch per iteration and adds ``batch_size``
        tokens; the simulator steps requests one by one, so one token is 1/running of an
        iteration. True when a decode log point (every ``decode_log_interval``
        iterations) is reached: the caller then publishes the gauges.
        """
        self._realtime("decode", 1)
        self._generated_since_log += 1
        self.forward_ct_decode += 1.0 / max(1, running)
        if self.forward_ct_decode + 1e-9 < self._next_decode_log:
            return False
        self._next_decode_log = self.forward_ct_decode + self.decode_log_interval
        return True

    def decode_log(self, stats: SchedulerStats) -> None:
        now = time.perf_counter()
        gap = now - self._last_decode_log
        self._last_decode_log = now
        stats.gen_throughput = self._generated_since_log / gap if gap > 0 else 0.0
        self._generated_since_log = 0
        stats.cache_hit_rate = 0.0  # the decode log point publishes 0 (metrics_reporter.py)
        self.publish(stats)

    def maybe_idle_log(self, stats: SchedulerStats) -> None:
        """``_maybe_log_idle_metrics``: the idle scheduler republishes a stale gauge."""
        stale = self.published.num_running_reqs != stats.num_running_reqs
        if not stale and time.monotonic() <= self.last_log_time + IDLE_REPUBLISH:
            return
        stats.gen_throughput = 0.0
        stats.cache_hit_rate = self.published.cache_hit_rate
        self.publish(stats)

    def publish(self, stats: SchedulerStats) -> None:
        self.published = stats
        self.last_log_time = time.monotonic()
        self.num_running_reqs.set(stats.num_running_reqs)
        self.num_queue_reqs.set(stats.num_queue_reqs)
        self.num_used_tokens.set(stats.num_used_tokens)
        self.max_total_num_tokens.set(stats.max_total_num_tokens)
        self.token_usage.set(stats.num_used_tokens / max(1, stats.max_total_num_tokens))
        self.gen_throughput.set(stats.gen_throughput)
        self.cache_hit_rate.set(stats.cache_hit_rate)
        self.utilization.set(stats.utilization)

    def _realtime(self, mode: str, n: int) -> None:
        if n:  # increment_realtime_tokens skips zero deltas: no series until first use
            self.realtime_tokens.labels(**self.sched_labels, mode=mode).inc(n)

    # -- tokenizer events -----------------------------------------------------------
    def first_token(self, latency: float, stream: bool) -> None:
        self.ttft.labels(**self.tok_labels, is_streaming=_streaming(stream)).observe(latency)

    def inter_tokens(self, interval: float, tokens: int) -> None:
        """``observe_inter_token_latency``: one output received with ``tokens`` new
        tokens after ``interval`` s adds ``tokens`` to the count and ``interval`` to the
        sum, each token in the bucket of interval / tokens."""
        for _ in range(tokens):
            self.itl.observe(interval / tokens)

    def finished(self, prompt: int, completion: int, cached: int, e2e: float, stream: bool) -> None:
        """``observe_one_finished_request``: the whole request, counted at its end."""
        labels = {**self.tok_labels, "is_streaming": _streaming(stream)}
        self.prompt_tokens.labels(**labels).inc(prompt)
        self.generation_tokens.labels(**labels).inc(completion)
        if cached > 0:
            self.cached_tokens.labels(**self.tok_labels, cache_source="device").inc(cached)
        self.num_requests.labels(**labels).inc()
        self.e2e.labels(**labels).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
