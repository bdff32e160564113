"""Prometheus metrics of one server (its own registry, so several apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.adapter_requests = Counter("lorakit_adapter_requests", "Requests per model (adapter or base)",
                                        ["model"], registry=r)
        self.token_count = Counter("lorakit_tokens", "Tokens processed", ["kind"], registry=r)
        self.batch_size = Histogram("lorakit_batch_size", "Rows per forward", ["phase"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_time = Histogram("lorakit_queue_seconds", "Time from arrival to the first forward",
                                    registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60))
        self.loaded = Gauge("lorakit_loaded_adapters", "Adapters loaded in memory", registry=r)
        self.running = Gauge("lorakit_running_requests", "Generation requests in the decode batch", registry=r)

    def batch(self, n: int, phase: str) -> None:
        self.batch_size.labels(phase).observe(n)

    def queued(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def tokens(self, kind: str, n: int) -> None:
        self.token_count.labels(kind).inc(n)
