"""Per-version counters kept by the core itself (served by ModelStatus and, later, by the Open
Inference Protocol's ModelStatistics); Prometheus metrics are the observer's business."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.core.observer import Observer, RejectReason


@dataclass(slots=True)
class VersionStatistics:
    request_success: int = 0
    request_failure: int = 0
    inference_count: int = 0
    execution_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)


class StatisticsRecorder(Observer):
    """An observer that folds batcher events into one version's VersionStatistics."""

    def __init__(self, stats: VersionStatistics) -> None:
        self.stats = stats

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        self.stats.request_failure += 1

    def batch_finished(
        self,
        model: str,
        version: int,
        rows: int,
        queue_times: Sequence[float],
        compute_time: float,
        error: BaseException | None,
        in_flight: int,
    ) -> None:
        s = self.stats
        if error is not None:
            s.request_failure += len(queue_times)
            return
        s.request_success += len(queue_times)
        s.inference_count += rows
        s.execution_count += 1
        s.queue_ns += int(sum(queue_times) * 1e9)
        s.compute_ns += int(compute_time * 1e9)
        s.batch_sizes[rows] += 1
