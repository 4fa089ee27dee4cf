"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Requests, tokens, latencies, queue depth, KV bytes held and document-cache use."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("snapkv_requests", "Requests by endpoint and HTTP status", ["endpoint", "status"],
                                registry=r)
        self.finished = Counter("snapkv_requests_finished", "Generations by finish reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("snapkv_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.kept_tokens = Counter("snapkv_kept_prompt_tokens", "Prompt tokens kept in the cache", registry=r)
        self.completion_tokens = Counter("snapkv_completion_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("snapkv_cached_prompt_tokens", "Prompt tokens read from the document cache",
                                     registry=r)
        self.ttft = Histogram("snapkv_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.step = Histogram("snapkv_decode_step_seconds", "One decode step of the whole batch", buckets=_LATENCY,
                              registry=r)
        self.batch = Gauge("snapkv_decode_batch", "Rows in the last decode step", registry=r)
        self.queue_depth = Gauge("snapkv_queue_depth", "Requests waiting for a row", registry=r)
        self.busy_rows = Gauge("snapkv_busy_rows", "Rows held by requests (prefilling or decoding)", registry=r)
        self.kv_bytes = Gauge("snapkv_kv_bytes_held", "KV cache bytes held by busy rows", registry=r)
        self.doc_hits = Gauge("snapkv_doc_cache_hits", "Document cache hits since start", registry=r)
        self.doc_misses = Gauge("snapkv_doc_cache_misses", "Document cache misses since start", registry=r)
        self.doc_bytes = Gauge("snapkv_doc_cache_bytes", "Bytes held by the document cache", registry=r)
        self.doc_entries = Gauge("snapkv_doc_cache_entries", "Documents held by the document cache", registry=r)

    def bind(self, stats: Callable[[], dict[str, int]], doc_cache: Any) -> None:
        """Read the live gauges from the scheduler's stats and the document cache at scrape time."""
        self.queue_depth.set_function(lambda: stats()["queued"])
        self.busy_rows.set_function(lambda: stats()["busy_rows"])
        self.kv_bytes.set_function(lambda: stats()["kv_bytes_held"])
        self.doc_hits.set_function(lambda: doc_cache.hits)
        self.doc_misses.set_function(lambda: doc_cache.misses)
        self.doc_bytes.set_function(lambda: doc_cache.bytes)
        self.doc_entries.set_function(lambda: len(doc_cache))

    def observe_step(self, seconds: float, rows: int) -> None:
        """One decode step."""
        self.step.observe(seconds)
        self.batch.set(rows)

    def observe_request(self, comp: Any) -> None:
        """A finished generation (a :class:`~snapkv.serve.scheduler.Completion`)."""
        self.finished.labels(comp.finish_reason).inc()
        self.prompt_tokens.inc(comp.prompt_tokens)
        self.kept_tokens.inc(comp.kept_tokens)
        self.completion_tokens.inc(comp.completion_tokens)
        self.cached_tokens.inc(comp.cached_tokens)
        if comp.ttft_s > 0:
            self.ttft.observe(comp.ttft_s)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
