"""The processes of `inferd serve --workers N`, in /metrics: how many of each role are up,
their pids, and how often the supervisor had to restart one (prometheus-client's multiprocess
mode sums each process's values; a dead process's gauges go with it)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge

from inferd.core.observer import Observer


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
