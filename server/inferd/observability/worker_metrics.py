"""The processes of `inferd serve --workers N`, in /metrics: how many of each role are up,
their pids, and how often the supervisor had to restart one (prometheus-client's multiprocess
mode sums each process's values; a dead process's gauges go with it)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from inferd.core.observer import Observer

# Seconds between two copies of a frontend's scrape-time figures (`CollectorMirror`).
MIRROR_INTERVAL_S = 1.0


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Exposed by the engine's multiprocess collector, not through this registry.
        r = registry or CollectorRegistry()
        self.up = Gauge(
            "inferd_workers",
            "Processes of the server that are up, by role (engine, frontend)",
            ("role",),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.process = Gauge(
            "inferd_worker_process",
            "1 per process that is up, by role and pid",
            ("role", "worker_pid"),
            registry=r,
            multiprocess_mode="livesum",
        )
        self.restarts = Counter(
            "inferd_worker_restarts",
            "Processes the supervisor restarted after they died, by role",
            ("role",),
            registry=r,
        )

    def started(self, role: str, restarted: bool) -> None:
        self.up.labels(role).set(1)
        self.process.labels(role, str(os.getpid())).set(1)
        self.restarts.labels(role).inc(1 if restarted else 0)


class AnsweredHere(Observer):
    """Counts the requests this frontend answered, labelled with its pid: which process served
    what (a debug figure; the per-model counts are `inferd_requests_total`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._count = Counter(
            "inferd_worker_requests",
            "Inference requests a frontend answered (any outcome), by its pid",
            ("worker_pid",),
            registry=registry or CollectorRegistry(),
        ).labels(str(os.getpid()))

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        self._count.inc()


class CollectorMirror:
    """Copies what collectors that read a process's own counters at scrape time report
    (admission, TLS reloads) into prometheus-client's multiprocess files, so that the engine's
    /metrics shows them summed over the frontends. Called every MIRROR_INTERVAL_S and once at
    stop: those figures may lag by that much."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = tuple(collectors)
        # Where the copies are registered (what a test reads; the engine exposes the files).
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Gauge | Counter] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def update(self) -> None:
        for collector in self._collectors:
            for family in collector.collect():
                if family.type not in ("gauge", "counter"):
                    continue
                for sample in family.samples:
                    if family.type == "counter" and not sample.name.endswith("_total"):
                        continue
                    self._record(family, tuple(sample.labels), tuple(sample.labels.values()),
                                 sample.value)  # fmt: skip

    def _record(
        self, family: Metric, names: tuple[str, ...], values: tuple[str, ...], value: float
    ) -> None:
        metric = self._metrics.get(family.name)
        if metric is None:
            if family.type == "gauge":
                metric = Gauge(
                    family.name,
                    family.documentation,
                    names,
                    registry=self.registry,
                    multiprocess_mode="livesum",
                )
            else:
                metric = Counter(family.name, family.documentation, names, registry=self.registry)
            self._metrics[family.name] = metric
        child = metric.labels(*values) if names else metric
        if isinstance(metric, Gauge):
            child.set(value)  # type: ignore[union-attr]
            return
        key = (family.name, values)
        delta = value - self._last.get(key, 0.0)
        self._last[key] = value
        if delta > 0:
            child.inc(delta)  # type: ignore[union-attr]
