"""GPU gauges from NVML (nvidia-ml-py), one `gpu_uuid` label each, read at scrape time.

Where NVML cannot start (no driver, no GPU) the collector yields nothing: the series are absent,
not zero, so a dashboard never mistakes a CPU box for an idle GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._handles: list[tuple[str, Any]] = []
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            for i in range(self._nvml.nvmlDeviceGetCount()):
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = self._nvml.nvmlDeviceGetUUID(handle)
                self._handles.append((uuid.decode() if isinstance(uuid, bytes) else uuid, handle))
        except Exception as exc:  # NVMLError and ImportError alike mean: no GPU metrics
            log.info("no NVML GPU found (%s); GPU metrics are off", type(exc).__name__)
            self._handles = []

    @property
    def gpus(self) -> int:
        return len(self._handles)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self._handles:
            return
        nvml = self._nvml
        util = GaugeMetricFamily(
            "inferd_gpu_utilization", "GPU busy fraction (0-1)", labels=["gpu_uuid"]
        )
        used = GaugeMetricFamily(
            "inferd_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu_uuid"]
        )
        total = GaugeMetricFamily(
            "inferd_gpu_memory_total_bytes", "GPU memory in all", labels=["gpu_uuid"]
        )
        power = GaugeMetricFamily(
            "inferd_gpu_power_usage_watts", "GPU power draw", labels=["gpu_uuid"]
        )
        for uuid, handle in self._handles:
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                milliwatts = nvml.nvmlDeviceGetPowerUsage(handle)
            except Exception as exc:
                log.warning("reading GPU %s failed: %s", uuid, exc)
                continue
            util.add_metric([uuid], rates.gpu / 100.0)
            used.add_metric([uuid], float(memory.used))
            total.add_metric([uuid], float(memory.total))
            power.add_metric([uuid], milliwatts / 1000.0)
        yield from (util, used, total, power)
