"""Prometheus metrics: an Observer that records the core's events, served over HTTP.

A version's series live as long as the registry lists it: they appear, at zero, when it turns
READY (so that `rate()` sees its first requests), and go when the registry forgets it
(`retired_retention_s` after it was UNLOADED)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from inferd.core.observer import BatchReport, Observer, RejectReason, RepositoryProblem
from inferd.core.types import ModelState

# 50 µs to ~13 s, doubling: covers a tiny model's queue wait and a slow CPU batch alike.
LATENCY_BUCKETS = tuple(50e-6 * 2**k for k in range(19))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The frontends' protocol labels (PROTOCOL in server/inferd/api/native.py and oip.py): a READY
# version gets its request series for each, at zero.
PROTOCOLS = ("native", "oip")


class _VersionSeries:
    """One model version's metric children, looked up once: `labels()` hashes its label values
    and takes a lock on every call, which the per-batch and per-request hooks would pay each
    time."""

    __slots__ = (
        "batch_failures",
        "batch_size",
        "compute",
        "execution_count",
        "in_flight",
        "inference_count",
        "queue",
        "queue_depth",
    )

    def __init__(self, observer: PrometheusObserver, model: str, version: str) -> None:
        o = observer
        self.queue = o.queue_duration.labels(model, version)
        self.compute = o.compute_duration.labels(model, version)
        self.batch_size = o.batch_size.labels(model, version)
        self.inference_count = o.inference_count.labels(model, version)
        self.execution_count = o.execution_count.labels(model, version)
        self.batch_failures = o.batch_failures.labels(model, version)
        self.queue_depth = o.queue_depth.labels(model, version)
        self.in_flight = o.in_flight.labels(model, version)


class PrometheusObserver(Observer):
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        latency_buckets: Sequence[float] = LATENCY_BUCKETS,
        protocols: Sequence[str] = PROTOCOLS,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._protocols = tuple(protocols)
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
        self.queue_depth = _gauge(
            "inferd_queue_depth", "Requests waiting in the batcher's queue", mv, registry=r
        )
        self.queue_capacity = _gauge(
            "inferd_queue_capacity", "The version's max_queue_size", mv, registry=r
        )
        self.in_flight = _gauge("inferd_batches_in_flight", "Batches executing now", mv, registry=r)
        self.model_state = _gauge(
            "inferd_model_state",
            "1 for the version's current state, 0 for the others",
            (*mv, "state"),
            registry=r,
        )
        self.load_duration = _gauge(
            "inferd_model_load_duration_seconds",
            "How long the version's last load took",
            mv,
            registry=r,
        )
        self.repository_problems = _gauge(
            "inferd_repository_problems",
            "1 for each thing the last repository scan skipped (see the server's log for why)",
            ("model", "path", "problem"),
            registry=r,
        )
        # Every labelled family with exactly (model, version) labels: what a forgotten version
        # takes with it, besides its rejections, states and requests.
        self._per_version = (
            self.queue_duration,
            self.compute_duration,
            self.batch_size,
            self.inference_count,
            self.execution_count,
            self.batch_failures,
            self.queue_depth,
            self.queue_capacity,
            self.in_flight,
            self.load_duration,
        )

        self._versions: dict[tuple[str, int], _VersionSeries] = {}
        # (protocol, model, version, code) -> (requests child, request_duration child)
        self._requests: dict[tuple[str, str, int | None, str], tuple[Any, Any]] = {}
        # model -> its versions the registry lists (any state but UNKNOWN).
        self._listed: dict[str, set[int]] = {}
        self._problems: set[tuple[str, str, str]] = set()

    def _series(self, model: str, version: int) -> _VersionSeries:
        series = self._versions.get((model, version))
        if series is None:
            series = self._versions[(model, version)] = _VersionSeries(self, model, str(version))
        return series

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        self.rejections.labels(model, str(version), reason.value).inc()

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        self._series(model, version).queue_depth.set(depth)

    def queue_capacity_set(self, model: str, version: int, capacity: int) -> None:
        self.queue_capacity.labels(model, str(version)).set(capacity)

    def batch_started(self, model: str, version: int, rows: int, in_flight: int) -> None:
        self._series(model, version).in_flight.set(in_flight)

    def batch_finished(self, report: BatchReport) -> None:
        series = self._series(report.model, report.version)
        series.in_flight.set(report.in_flight)
        if report.error is not None:
            series.batch_failures.inc()
            return
        for wait in report.queue_times:
            series.queue.observe(wait)
        series.compute.observe(report.compute_time)
        series.batch_size.observe(report.rows)
        series.inference_count.inc(report.rows)
        series.execution_count.inc()

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        if state is ModelState.UNKNOWN:
            self._forget(model, version)
            return
        self._listed.setdefault(model, set()).add(version)
        v = str(version)
        for s in ModelState:
            self.model_state.labels(model, v, s.value).set(1 if s is state else 0)
        if load_time is not None:
            self.load_duration.labels(model, v).set(load_time)
        if state is ModelState.READY:
            # Every series a request or batch of it would create, at zero from now on.
            self._series(model, version)
            for rejection in RejectReason:
                self.rejections.labels(model, v, rejection.value)
            for protocol in self._protocols:
                self._request_series(protocol, model, version, "OK")

    def _forget(self, model: str, version: int) -> None:
        """Remove every series of a version the registry no longer lists; and the model's
        own (requests that named no READY version) once none of its versions is listed."""
        v = str(version)
        self._versions.pop((model, version), None)
        for family in self._per_version:
            _remove(family, model, v)
        for rejection in RejectReason:
            _remove(self.rejections, model, v, rejection.value)
        for s in ModelState:
            _remove(self.model_state, model, v, s.value)
        listed = self._listed.get(model, set())
        listed.discard(version)
        if not listed:
            self._listed.pop(model, None)
        gone = {version, None} if not listed else {version}
        for key in [k for k in self._requests if k[1] == model and k[2] in gone]:
            protocol, _, number, code = key
            label = "" if number is None else str(number)
            del self._requests[key]
            _remove(self.requests, protocol, model, label, code)
            _remove(self.request_duration, protocol, model, label)

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        # Per request: the cached children first, without a call.
        children = self._requests.get((protocol, model, version, code))
        if children is None:
            children = self._request_series(protocol, model, version, code)
        count, duration_histogram = children
        count.inc()
        duration_histogram.observe(duration)

    def _request_series(
        self, protocol: str, model: str, version: int | None, code: str
    ) -> tuple[Any, Any]:
        key = (protocol, model, version, code)
        children = self._requests.get(key)
        if children is None:
            # The model label is a served model's name or "" (the frontends see to it), and
            # codes are few: this map stays as small as the series it caches.
            v = "" if version is None else str(version)
            children = self._requests[key] = (
                self.requests.labels(protocol, model, v, code),
                self.request_duration.labels(protocol, model, v),
            )
        return children

    def repository_problems_changed(self, problems: Sequence[RepositoryProblem]) -> None:
        current = {(p.model, p.path, p.kind) for p in problems}
        for labels in self._problems - current:
            _remove(self.repository_problems, *labels)
        for labels in current:
            self.repository_problems.labels(*labels).set(1)
        self._problems = current

    def serve(
        self, host: str, port: int, registry: CollectorRegistry | None = None
    ) -> tuple[Any, int]:
        """Start the /metrics HTTP endpoint on its own thread, serving `registry` (this
        observer's own by default); returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=registry or self.registry)
        return server, server.server_port


def _gauge(*args: Any, **kwargs: Any) -> Gauge:
    """Every gauge is set by the engine alone: under `--workers N` (prometheus-client's
    multiprocess mode) /metrics shows the sum over live processes, i.e. the engine's value,
    and a dead engine's values go with it."""
    return Gauge(*args, multiprocess_mode="livesum", **kwargs)


def _remove(family: Any, *labels: str) -> None:
    # Older prometheus_client releases raise KeyError for a child they do not have.
    with contextlib.suppress(KeyError):
        family.remove(*labels)
