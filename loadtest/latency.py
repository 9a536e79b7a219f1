"""Latency arithmetic: exact merging of raw samples, percentiles, window agreement.

Latencies travel as raw float64 arrays of seconds (one per worker and window), so merging is
concatenation and every percentile is exact. At the rates this machine reaches (a few thousand
requests/s, windows of seconds) that is a few hundred kilobytes per window; a histogram would
only trade exactness for memory we do not need to save.

Percentiles are nearest-rank: p99 is the smallest latency that at
least 99 % of requests did not exceed, always one of the observed values, as HdrHistogram and
perf_analyzer report it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)


def merge_samples(samples: Iterable[np.ndarray]) -> np.ndarray:
    """All samples in one float64 array (order does not matter to any statistic here)."""
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    if not arrays:
        return np.empty(0, dtype=np.float64)
    return np.concatenate(arrays)


def percentiles(latencies: np.ndarray, points: Sequence[float] = PERCENTILES) -> list[float]:
    """Nearest-rank percentiles of `latencies`; NaN for an empty sample.

    The rank is ceil(q/100 · n), computed after rounding away float noise (99.9/100 · 1000
    is 999.0000000000001 in binary, which numpy's own inverted_cdf rounds up to rank 1000).
    """
    n = latencies.size
    if n == 0:
        return [float("nan")] * len(points)
    ranks = [min(n, max(1, math.ceil(round(q * n / 100.0, 9)))) for q in points]
    ordered = np.partition(latencies, sorted({r - 1 for r in ranks}))
    return [float(ordered[r - 1]) for r in ranks]


@dataclass(frozen=True)
class LatencySummary:
    """Latency of the successful requests of one load level, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, latencies_s: np.ndarray) -> LatencySummary:
        p50, p90, p95, p99, p999 = (v * 1e3 for v in percentiles(latencies_s))
        if latencies_s.size == 0:
            return cls(0, float("nan"), p50, p90, p95, p99, p999, float("nan"))
        return cls(
            count=int(latencies_s.size),
            mean_ms=float(latencies_s.mean() * 1e3),
            p50_ms=p50,
            p90_ms=p90,
            p95_ms=p95,
            p99_ms=p99,
            p999_ms=p999,
            max_ms=float(latencies_s.max() * 1e3),
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def agree_within(values: Sequence[float], tolerance: float) -> bool:
    """True when every value lies within `tolerance` (a fraction) of their mean.

    The stopping rule of a load level: its last three windows must agree on throughput and on
    median latency, as perf_analyzer's stability check does.
    """
    if not values:
        return False
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        return False
    mean = float(array.mean())
    if mean == 0.0:
        return bool(np.all(array == 0.0))
    return bool(np.max(np.abs(array - mean)) <= tolerance * abs(mean))


def empirical_cdf(latencies: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(sorted latencies, cumulative fraction) thinned to about `points` points for plotting;
    the first and last samples are always kept, so the curve ends at the true maximum."""
    ordered = np.sort(latencies)
    if ordered.size == 0:
        return ordered, ordered
    fractions = np.arange(1, ordered.size + 1, dtype=np.float64) / ordered.size
    if ordered.size <= points:
        return ordered, fractions
    index = np.unique(np.linspace(0, ordered.size - 1, points).astype(np.int64))
    return ordered[index], fractions[index]
