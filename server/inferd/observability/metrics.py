"""Prometheus metrics: an Observer that records the core's events, served over HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inferd.core.observer import BatchReport, Observer, RejectReason
from inferd.core.types import ModelState

# 50 µs to ~13 s, doubling: covers a tiny model's queue wait and a slow CPU batch alike.
LATENCY_BUCKETS = tuple(50e-6 * 2**k for k in range(19))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class PrometheusObserver(Observer):
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        mv = ("model", "version")
        self.requests = Counter(
            "inferd_requests",
            "Requests answered, by protocol and gRPC code",
            ("protocol", "model", "version", "code"),
            registry=r,
        )
        self.request_duration = Histogram(
            "inferd_request_duration_seconds",
            "From arrival at the frontend to the reply, any outcome",
            ("protocol", "model", "version"),
            buckets=tuple(latency_buckets),
            registry=r,
        )
        self.queue_duration = Histogram(
            "inferd_queue_duration_seconds",
            "Time a request waited in the batcher's queue before its batch started",
            mv,
            buckets=tuple(latency_buckets),
            registry=r,
        )
        self.compute_duration = Histogram(
            "inferd_compute_duration_seconds",
            "Time one batch took to execute (concatenate, run, split)",
            mv,
            buckets=tuple(latency_buckets),
            registry=r,
        )
        self.batch_size = Histogram(
            "inferd_batch_size",
            "Rows per executed batch",
            mv,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference_count = Counter("inferd_inference_count", "Rows executed", mv, registry=r)
        self.execution_count = Counter("inferd_execution_count", "Batches executed", mv, registry=r)
        self.batch_failures = Counter(
            "inferd_batch_failures", "Batches whose execution failed", mv, registry=r
        )
        self.rejections = Counter(
            "inferd_rejections",
            "Requests answered without executing, by reason",
            (*mv, "reason"),
            registry=r,
        )
        self.queue_depth = Gauge(
            "inferd_queue_depth", "Requests waiting in the batcher's queue", mv, registry=r
        )
        self.queue_capacity = Gauge(
            "inferd_queue_capacity", "The version's max_queue_size", mv, registry=r
        )
        self.in_flight = Gauge("inferd_batches_in_flight", "Batches executing now", mv, registry=r)
        self.model_state = Gauge(
            "inferd_model_state",
            "1 for the version's current state, 0 for the others",
            (*mv, "state"),
            registry=r,
        )
        self.load_duration = Gauge(
            "inferd_model_load_duration_seconds",
            "How long the version's last load took",
            mv,
            registry=r,
        )

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        self.rejections.labels(model, str(version), reason.value).inc()

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        self.queue_depth.labels(model, str(version)).set(depth)

    def queue_capacity_set(self, model: str, version: int, capacity: int) -> None:
        self.queue_capacity.labels(model, str(version)).set(capacity)

    def batch_started(self, model: str, version: int, rows: int, in_flight: int) -> None:
        self.in_flight.labels(model, str(version)).set(in_flight)

    def batch_finished(self, report: BatchReport) -> None:
        labels = (report.model, str(report.version))
        self.in_flight.labels(*labels).set(report.in_flight)
        if report.error is not None:
            self.batch_failures.labels(*labels).inc()
            return
        queue = self.queue_duration.labels(*labels)
        for wait in report.queue_times:
            queue.observe(wait)
        self.compute_duration.labels(*labels).observe(report.compute_time)
        self.batch_size.labels(*labels).observe(report.rows)
        self.inference_count.labels(*labels).inc(report.rows)
        self.execution_count.labels(*labels).inc()

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        for s in ModelState:
            self.model_state.labels(model, str(version), s.value).set(1 if s is state else 0)
        if load_time is not None:
            self.load_duration.labels(model, str(version)).set(load_time)

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        v = "" if version is None else str(version)
        self.requests.labels(protocol, model, v, code).inc()
        self.request_duration.labels(protocol, model, v).observe(duration)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP endpoint on its own thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
