"""Per-version counters kept by the core itself (served by ModelStatus and by the Open Inference
Protocol's ModelStatistics); Prometheus metrics are the observer's business."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from inferd.core.observer import BatchReport, Observer, RejectReason


@dataclass(slots=True)
class Duration:
    """How many, and how long in total (nanoseconds)."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass(slots=True)
class BatchSizeStatistics:
    """Batches executed at one size (rows): their count and the runtime's time split."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStatistics:
    # Requests answered with outputs / with an error, and their time in the batcher.
    success: Duration = field(default_factory=Duration)
    failure: Duration = field(default_factory=Duration)
    # Per successful request: its wait in the queue, and its batch's runtime split.
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    # Per successful request, the stages around the batch: the frontend's decoding and
    # encoding, the hand-off to the runtime and back, and the handler's whole time.
    decode: Duration = field(default_factory=Duration)
    handoff: Duration = field(default_factory=Duration)
    encode: Duration = field(default_factory=Duration)
    handler: Duration = field(default_factory=Duration)
    # Rows executed, and batches executed.
    inference_count: int = 0
    execution_count: int = 0
    batch_stats: dict[int, BatchSizeStatistics] = field(default_factory=dict)
    last_inference_ns: int = 0

    def request_served(self, decode: float, encode: float, handler: float) -> None:
        """A frontend answered a request with outputs: its own stages, in seconds."""
        self.decode.add(decode)
        self.encode.add(encode)
        self.handler.add(handler)

    @property
    def batch_sizes(self) -> dict[int, int]:
        return {size: s.compute_infer.count for size, s in self.batch_stats.items()}


class StatisticsRecorder(Observer):
    """An observer that folds batcher events into one version's VersionStatistics."""

    def __init__(
        self, stats: VersionStatistics, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.stats = stats
        self._clock_ns = clock_ns

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        self.stats.failure.add(0.0)

    def batch_finished(self, report: BatchReport) -> None:
        s = self.stats
        if report.error is not None:
            if report.retried:
                # Those still waiting run again alone and are counted then; those whose caller
                # gave up meanwhile are answered now, by that.
                for wait, gone in zip(report.queue_times, report.abandoned, strict=True):
                    if gone:
                        s.failure.add(wait + report.compute_time)
                return
            for wait in report.queue_times:
                s.failure.add(wait + report.compute_time)
            return
        n = report.requests
        abandoned = report.abandoned or (False,) * n
        for wait, gone in zip(report.queue_times, abandoned, strict=True):
            if gone:
                s.failure.add(wait + report.compute_time)
                continue
            s.success.add(wait + report.compute_time)
            s.queue.add(wait)
        s.compute_input.add(report.input_time * n, n)
        s.compute_infer.add(report.infer_time * n, n)
        s.compute_output.add(report.output_time * n, n)
        runtime = report.input_time + report.infer_time + report.output_time
        s.handoff.add(max(report.compute_time - runtime, 0.0) * n, n)
        s.inference_count += report.rows
        s.execution_count += 1
        size = s.batch_stats.setdefault(report.rows, BatchSizeStatistics())
        size.compute_input.add(report.input_time)
        size.compute_infer.add(report.infer_time)
        size.compute_output.add(report.output_time)
        s.last_inference_ns = self._clock_ns()
