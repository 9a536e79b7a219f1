"""Admission control's figures, read from the plain counters the request path keeps (no
Prometheus call on that path) when /metrics is scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inferd.api import status
from inferd.core.admission import ByteBudget


class AdmissionCollector(Collector):
    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        b = self._budget
        yield GaugeMetricFamily(
            "inferd_request_bytes_in_flight",
            "Bytes of inference request messages held by requests in flight",
            value=b.in_use,
        )
        yield GaugeMetricFamily(
            "inferd_request_bytes_budget",
            "max_request_bytes_in_flight: the most request bytes the server holds at once",
            value=b.limit,
        )
        yield CounterMetricFamily(
            "inferd_request_bytes_refusals",
            "Requests refused RESOURCE_EXHAUSTED because the byte budget was spent",
            value=b.refused,
        )
        yield CounterMetricFamily(
            "inferd_unanswered_errors",
            "Errors not sent because the caller had already gone (deadline, cancel)",
            value=status.unanswered.count,
        )
