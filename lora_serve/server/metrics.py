"""Prometheus metrics of the server: per-model request and token counters, latency histograms, and the
engine's queue, pool and adapter-cache state read at scrape time.

Counters carry a ``model`` label (the base model or an adapter name) so each adapter's traffic can be
followed; histograms do not, because their bucket series times thousands of adapters would swamp the
scraper. Each server owns its registry, so several servers (e.g. in tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine import EngineStats
from ..request import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Exports ``EngineStats`` as gauges and counters each time Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self):
        """Yield the metric families of one engine snapshot."""
        stats = self._stats()
        pool = GaugeMetricFamily(
            "lora_serve_pool_slots", "Unified pool slots (pages) by use: kv, adapters or free.", labels=["use"]
        )
        for use, value in (("kv", stats.pool.kv), ("adapters", stats.pool.adapters), ("free", stats.pool.free)):
            pool.add_metric([use], value)
        yield pool
        yield GaugeMetricFamily("lora_serve_pool_capacity_slots", "Slots in the unified pool.", value=stats.pool.total)
        yield GaugeMetricFamily("lora_serve_requests_running", "Requests in the running batch.", value=stats.running)
        yield GaugeMetricFamily("lora_serve_requests_waiting", "Requests queued for admission.", value=stats.waiting)
        adapters = GaugeMetricFamily(
            "lora_serve_adapters", "Adapters registered (host memory) and resident (in the pool).", labels=["state"]
        )
        adapters.add_metric(["registered"], stats.adapters_registered)
        adapters.add_metric(["resident"], stats.adapters_resident)
        yield adapters
        yield GaugeMetricFamily(
            "lora_serve_adapter_host_bytes", "Host memory of the registered adapters' weights (shared copies once).",
            value=stats.adapter_host_bytes,
        )
        yield CounterMetricFamily(
            "lora_serve_adapter_loads", "Adapter copies into the pool since start.", value=stats.adapter_loads
        )
        yield CounterMetricFamily(
            "lora_serve_adapter_evictions", "Adapters evicted from the pool since start.", value=stats.adapter_evictions
        )


class ServerMetrics:
    """The server's Prometheus registry and the helpers that record each request into it."""

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lora_serve_requests", "Finished generation requests by model and finish reason.",
            ["model", "finish_reason"], registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "lora_serve_prompt_tokens", "Prompt tokens of admitted requests.", ["model"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "lora_serve_generation_tokens", "Tokens generated.", ["model"], registry=self.registry
        )
        self.errors = Counter(
            "lora_serve_http_errors", "Error responses by HTTP status.", ["status"], registry=self.registry
        )
        self.latency = Histogram(
            "lora_serve_request_latency_seconds", "Time from submission to the last token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.first_token = Histogram(
            "lora_serve_time_to_first_token_seconds", "Time from submission to the first token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inter_token = Histogram(
            "lora_serve_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats))

    def count_error(self, status: int) -> None:
        """Count one error response."""
        self.errors.labels(status=str(status)).inc()

    async def track(
        self, model: str, prompt_tokens: int, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        """Pass ``outputs`` through, recording tokens and latencies.

        A stream left early (client gone, request cancelled) counts as ``abort``; one the engine refused at
        submission (``KeyError`` / ``ValueError``, answered with a 4xx) is not counted as a request.
        """
        start = last = time.perf_counter()
        finish_reason: str | None = "abort"
        try:
            async for output in outputs:
                if output.token_ids:
                    now = time.perf_counter()
                    (self.inter_token if last > start else self.first_token).observe(now - last)
                    last = now
                    self.generation_tokens.labels(model=model).inc(len(output.token_ids))
                if output.finished:
                    finish_reason = output.finish_reason.value
                yield output
        except (KeyError, ValueError):
            finish_reason = None
            raise
        finally:
            if finish_reason is not None:
                self.prompt_tokens.labels(model=model).inc(prompt_tokens)
                self.latency.observe(time.perf_counter() - start)
                self.requests.labels(model=model, finish_reason=finish_reason).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text format (reads the engine's stats, which waits for its lock)."""
        return generate_latest(self.registry)
