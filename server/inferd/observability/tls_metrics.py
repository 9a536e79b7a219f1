"""TLS certificate reloads on /metrics, read from the counts `inferd.tls` keeps."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from inferd.tls import ReloadCounts


class TlsCollector(Collector):
    """`inferd_tls_certificate_reloads_total{result="ok|error"}`; both 0 without TLS, so the
    series exist (and alerts on them evaluate) on every server."""

    def __init__(self, counts: ReloadCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "inferd_tls_certificate_reloads",
            "Certificate files re-read after a change or SIGHUP: ok (new connections use them) "
            "or error (the previous certificate still serves)",
            labels=("result",),
        )
        family.add_metric(("ok",), self._counts.ok)
        family.add_metric(("error",), self._counts.error)
        yield family
