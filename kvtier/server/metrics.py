"""Prometheus metrics of the server, in a registry of its own.

Per-request figures (latencies, token counts, finish reasons) are observed in the API process as
outputs arrive; cache and pool figures are read from the scheduler's stats at each scrape.
Metric names carry the ``kvtier:`` prefix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.scheduler.request import ReqOutput

PREFIX = "kvtier:"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

# scheduler stats key -> (metric name, help); gauges
_GAUGES = {
    "num_running": ("num_running_reqs", "requests being decoded or prefilled"),
    "num_waiting": ("num_queue_reqs", "requests waiting for admission"),
    "device_used_tokens": ("gpu_pool_used_tokens", "token slots of the GPU KV pool in use"),
    "device_total_tokens": ("gpu_pool_total_tokens", "token slots of the GPU KV pool"),
    "l2_used_tokens": ("l2_used_tokens", "token slots of the L2 tier in use"),
    "l2_total_tokens": ("l2_total_tokens", "token slots of the L2 tier"),
    "load_bandwidth_gbps": ("load_bandwidth_gbps", "mean L2 -> GPU load bandwidth (GB/s)"),
    "backup_bandwidth_gbps": ("backup_bandwidth_gbps", "mean GPU -> L2 backup bandwidth (GB/s)"),
}
# scheduler stats key -> (metric name without _total, help); cumulative counters
_COUNTERS = {
    "loaded_bytes": ("loaded_bytes", "bytes loaded from L2 into the GPU pool"),
    "backed_up_bytes": ("backed_up_bytes", "bytes backed up from the GPU pool to L2"),
    "forward_steps": ("forward_steps", "forward passes run"),
    "decode_steps_ahead": (
        "decode_steps_ahead",
        "decode steps launched while the previous step was still running (overlap scheduling)",
    ),
    "retractions": ("retractions", "running requests sent back to the queue (out of pages)"),
    "tail_tokens_copied": (
        "tail_tokens_copied",
        "prefix tokens served by copying the head of a cached page instead of recomputing them",
    ),
}


class _StatsCollector(Collector):
    """Exposes the latest scheduler stats snapshot (set before each scrape)."""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for key, (name, doc) in _GAUGES.items():
            if key in s:
                yield GaugeMetricFamily(PREFIX + name, doc, value=float(s[key]))
        for key, (name, doc) in _COUNTERS.items():
            if key in s:
                yield CounterMetricFamily(PREFIX + name, doc, value=float(s[key]))
        if s.get("device_cached_pages") is not None and "page_size" in s:
            yield GaugeMetricFamily(
                PREFIX + "gpu_cached_tokens",
                "token slots of the GPU pool held by the prefix cache",
                value=float(s["device_cached_pages"] * s["page_size"]),
            )
        if "prompt_tokens" in s:
            prompt = s["prompt_tokens"]
            yield GaugeMetricFamily(
                PREFIX + "cache_hit_rate",
                "share of prompt tokens served from a cache (any tier) since start",
                value=s.get("cached_tokens", 0) / prompt if prompt else 0.0,
            )


class RequestTimer:
    """Latency bookkeeping of one request."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last: float | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests", "finished requests", ["finish_reason"], registry=r
        )
        self.http_errors = Counter(
            PREFIX + "http_errors", "requests answered with an error", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "tokens generated", registry=r
        )
        self.cached_tokens = Counter(
            PREFIX + "cached_tokens",
            "prompt tokens whose KV came from a cache, by tier (device, dram, xmem, peer)",
            ["tier"],
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "time from a request's submission (after tokenization) to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "time between consecutive tokens of a request",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "time from a request's submission (after tokenization) to its last token",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self._stats = _StatsCollector()
        r.register(self._stats)

    def observe(self, timer: RequestTimer, out: ReqOutput) -> None:
        """Record one output of a request (and, when it is the last, the request)."""
        now = time.perf_counter()
        if out.new_ids:
            if timer.last is None:
                self.ttft.observe(now - timer.start)
            else:
                per_token = (now - timer.last) / len(out.new_ids)
                for _ in out.new_ids:
                    self.itl.observe(per_token)
            timer.last = now
            self.generation_tokens.inc(len(out.new_ids))
        if out.finished:
            meta = out.meta_info
            reason = (meta.get("finish_reason") or {}).get("type", "unknown")
            self.requests.labels(finish_reason=reason).inc()
            self.e2e.observe(now - timer.start)
            self.prompt_tokens.inc(meta.get("prompt_tokens", 0))
            for tier, n in (meta.get("cached_tokens_by_tier") or {}).items():
                self.cached_tokens.labels(tier=tier).inc(n)

    def observe_error(self, status: int) -> None:
        self.http_errors.labels(status=str(status)).inc()

    def render(self, stats: dict[str, Any] | None) -> bytes:
        """The exposition text; ``stats`` None (scheduler unreachable) leaves out its figures."""
        self._stats.stats = stats or {}
        return generate_latest(self.registry)
