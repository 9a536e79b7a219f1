"""What a worker records per request, and the measurement windows it cuts from that record.

A request belongs to the window in which it *completed*. Completions are appended in the order
they happen, so the entries before a window boundary are always a prefix of the log and cutting
a window is a bisection, not a scan.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inferd.loadtest.latency import merge_samples, percentiles


@dataclass
class WindowSample:
    """One worker's completions during one measurement window [start, end) (loop time)."""

    worker: int
    level: int
    index: int
    start: float
    end: float
    # Seconds, successful requests only; from the intended send time in an open loop.
    latencies: np.ndarray
    rows: int
    # gRPC status code name (or exception type for in-process runs) -> count.
    errors: dict[str, int] = field(default_factory=dict)
    # Open loop only: actual minus intended send time, seconds.
    send_lags: np.ndarray | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class MergedWindow:
    """All workers' completions during one window: what the stopping rule looks at."""

    index: int
    duration: float
    latencies: np.ndarray
    rows: int
    errors: Counter[str]
    send_lags: np.ndarray

    @property
    def requests_per_s(self) -> float:
        return self.latencies.size / self.duration if self.duration > 0 else 0.0

    @property
    def median_s(self) -> float:
        if self.latencies.size == 0:
            return float("nan")
        return percentiles(self.latencies, (50.0,))[0]

    @classmethod
    def of(cls, samples: Sequence[WindowSample]) -> MergedWindow:
        """Merge the samples of one window from every worker (they share its boundaries)."""
        if not samples:
            raise ValueError("no samples to merge")
        errors: Counter[str] = Counter()
        for sample in samples:
            errors.update(sample.errors)
        return cls(
            index=samples[0].index,
            duration=samples[0].duration,
            latencies=merge_samples(s.latencies for s in samples),
            rows=sum(s.rows for s in samples),
            errors=errors,
            send_lags=merge_samples(s.send_lags for s in samples if s.send_lags is not None),
        )

    @classmethod
    def combine(cls, windows: Sequence[MergedWindow]) -> MergedWindow:
        """Consecutive windows as one longer window (the measurement a level reports)."""
        if not windows:
            raise ValueError("no windows to combine")
        errors: Counter[str] = Counter()
        for window in windows:
            errors.update(window.errors)
        return cls(
            index=windows[-1].index,
            duration=sum(w.duration for w in windows),
            latencies=merge_samples(w.latencies for w in windows),
            rows=sum(w.rows for w in windows),
            errors=errors,
            send_lags=merge_samples(w.send_lags for w in windows),
        )


class CompletionLog:
    """Completion times and latencies of one worker's requests, in completion order."""

    def __init__(self, rows_per_request: int, open_loop: bool) -> None:
        self.rows_per_request = rows_per_request
        self.open_loop = open_loop
        self._done_at: list[float] = []
        self._latency: list[float] = []
        self._lag: list[float] = []
        self._failed_at: list[float] = []
        self._failure_code: list[str] = []

    def success(self, completed_at: float, latency: float, send_lag: float = 0.0) -> None:
        self._done_at.append(completed_at)
        self._latency.append(latency)
        if self.open_loop:
            self._lag.append(send_lag)

    def failure(self, completed_at: float, code: str) -> None:
        self._failed_at.append(completed_at)
        self._failure_code.append(code)

    def discard_before(self, boundary: float) -> None:
        """Forget everything that completed before `boundary` (the warm-up)."""
        self._take(boundary)

    def cut(self, worker: int, level: int, index: int, start: float, end: float) -> WindowSample:
        """The completions in [start, end), removed from the log; anything before `start` must
        already have been cut or discarded."""
        latencies, lags, codes = self._take(end)
        return WindowSample(
            worker=worker,
            level=level,
            index=index,
            start=start,
            end=end,
            latencies=latencies,
            rows=latencies.size * self.rows_per_request,
            errors=dict(Counter(codes)),
            send_lags=lags if self.open_loop else None,
        )

    def _take(self, boundary: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
        n = bisect.bisect_left(self._done_at, boundary)
        latencies = np.array(self._latency[:n], dtype=np.float64)
        lags = np.array(self._lag[:n], dtype=np.float64)
        del self._done_at[:n], self._latency[:n]
        if self.open_loop:
            del self._lag[:n]
        m = bisect.bisect_left(self._failed_at, boundary)
        codes = self._failure_code[:m]
        del self._failed_at[:m], self._failure_code[:m]
        return latencies, lags, codes
