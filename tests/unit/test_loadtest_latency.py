"""The load-test harness's arithmetic: percentiles, exact merging of per-worker samples,
measurement windows and server counter deltas, checked against numpy on known data."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from inferd.loadtest.completions import CompletionLog, MergedWindow, WindowSample
from inferd.loadtest.latency import (
    PERCENTILES,
    LatencySummary,
    agree_within,
    empirical_cdf,
    merge_samples,
    percentiles,
)
from inferd.loadtest.server_stats import ServerCounters, ServerSplit


def test_percentiles_of_one_to_a_thousand_are_the_nearest_ranks() -> None:
    latencies = np.arange(1, 1001, dtype=np.float64)  # 1..1000
    assert percentiles(latencies) == [500.0, 900.0, 950.0, 990.0, 999.0]


def test_percentiles_match_numpy_inverted_cdf_on_random_data() -> None:
    rng = np.random.default_rng(5)
    latencies = rng.lognormal(mean=-7, sigma=0.8, size=12_345)
    expected = np.percentile(latencies, PERCENTILES, method="inverted_cdf")
    np.testing.assert_array_equal(percentiles(latencies), expected)
    # Every reported percentile is an observed latency.
    assert all(v in set(latencies.tolist()) for v in percentiles(latencies))


def test_summary_reports_milliseconds_mean_and_max() -> None:
    latencies = np.arange(1, 1001, dtype=np.float64) / 1e3  # 1..1000 ms in seconds
    summary = LatencySummary.of(latencies)
    assert summary.count == 1000
    assert summary.p50_ms == pytest.approx(500.0)
    assert summary.p999_ms == pytest.approx(999.0)
    assert summary.max_ms == pytest.approx(1000.0)
    assert summary.mean_ms == pytest.approx(500.5)


def test_summary_of_nothing_is_nan_not_an_error() -> None:
    summary = LatencySummary.of(np.empty(0))
    assert summary.count == 0
    assert np.isnan(summary.p99_ms)


def _nearest_rank(latencies: np.ndarray, tenths: int) -> float:
    """The percentile `tenths`/10 by exact integer arithmetic: the ceil(q·n)-th smallest."""
    rank = max(1, -(-tenths * latencies.size // 1000))
    return float(np.sort(latencies)[rank - 1])


def test_merging_per_worker_samples_gives_the_percentiles_of_all_requests() -> None:
    rng = np.random.default_rng(11)
    everything = rng.exponential(0.002, size=20_000)
    cuts = [0, 17, 5_000, 5_001, 13_333, 20_000]  # uneven workers, one with a single sample
    parts = [everything[a:b] for a, b in itertools.pairwise(cuts)]
    merged = merge_samples(parts)
    assert merged.size == everything.size
    # 20 000 samples put p99.9 exactly on rank 19 980, where float rounding would pick 19 981.
    expected = [_nearest_rank(everything, t) for t in (500, 900, 950, 990, 999)]
    assert percentiles(merged) == expected
    assert merged.max() == everything.max()


def _sample(
    worker: int, index: int, latencies: list[float], errors: dict[str, int]
) -> WindowSample:
    return WindowSample(
        worker=worker,
        level=0,
        index=index,
        start=10.0 + 2 * index,
        end=12.0 + 2 * index,
        latencies=np.array(latencies),
        rows=4 * len(latencies),
        errors=errors,
    )


def test_window_merge_sums_counts_rows_and_errors_across_workers() -> None:
    window = MergedWindow.of(
        [
            _sample(0, 0, [0.001, 0.002], {"UNAVAILABLE": 1}),
            _sample(1, 0, [0.003], {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1}),
        ]
    )
    assert window.latencies.size == 3
    assert window.rows == 12
    assert window.errors == Counter({"UNAVAILABLE": 3, "RESOURCE_EXHAUSTED": 1})
    assert window.requests_per_s == pytest.approx(1.5)  # 3 requests in a 2 s window
    assert window.median_s == 0.002


def test_consecutive_windows_combine_into_one_measurement() -> None:
    first = MergedWindow.of([_sample(0, 0, [0.001] * 10, {})])
    second = MergedWindow.of([_sample(0, 1, [0.002] * 30, {"INTERNAL": 1})])
    both = MergedWindow.combine([first, second])
    assert both.duration == pytest.approx(4.0)
    assert both.requests_per_s == pytest.approx(10.0)
    assert both.rows == 160
    assert both.errors == Counter({"INTERNAL": 1})


@pytest.mark.parametrize(
    ("values", "tolerance", "agree"),
    [
        ([100.0, 105.0, 95.0], 0.10, True),
        ([100.0, 125.0, 95.0], 0.10, False),
        ([0.0, 0.0, 0.0], 0.10, True),
        ([1.0, float("nan"), 1.0], 0.10, False),
        ([], 0.10, False),
    ],
)
def test_windows_agree_when_each_is_within_the_tolerance_of_their_mean(
    values: list[float], tolerance: float, agree: bool
) -> None:
    assert agree_within(values, tolerance) is agree


def test_completion_log_assigns_requests_to_the_window_they_completed_in() -> None:
    log = CompletionLog(rows_per_request=2, open_loop=False)
    for done_at in (0.5, 0.9):  # warm-up
        log.success(done_at, 0.1)
    log.failure(0.95, "UNAVAILABLE")  # warm-up too
    for done_at in (1.0, 1.5, 1.999):
        log.success(done_at, 0.01)
    log.failure(1.2, "RESOURCE_EXHAUSTED")
    log.success(2.0, 0.02)  # exactly on the boundary: the next window
    log.discard_before(1.0)
    first = log.cut(worker=3, level=7, index=0, start=1.0, end=2.0)
    second = log.cut(worker=3, level=7, index=1, start=2.0, end=3.0)
    assert first.latencies.tolist() == [0.01, 0.01, 0.01]
    assert first.rows == 6
    assert first.errors == {"RESOURCE_EXHAUSTED": 1}
    assert first.send_lags is None
    assert second.latencies.tolist() == [0.02]
    assert (second.worker, second.level, second.index) == (3, 7, 1)


def test_open_loop_log_keeps_send_lag_beside_each_latency() -> None:
    log = CompletionLog(rows_per_request=1, open_loop=True)
    log.success(1.1, 0.010, send_lag=0.0)
    log.success(1.2, 0.030, send_lag=0.020)
    window = log.cut(0, 0, 0, 1.0, 2.0)
    assert window.send_lags is not None
    assert window.send_lags.tolist() == [0.0, 0.020]


def test_empirical_cdf_is_thinned_but_ends_at_the_maximum() -> None:
    latencies = np.random.default_rng(1).random(10_000)
    x, y = empirical_cdf(latencies, points=100)
    assert len(x) <= 100
    assert x[-1] == latencies.max()
    assert y[-1] == 1.0
    assert np.all(np.diff(x) >= 0)


def test_server_split_takes_deltas_between_snapshots() -> None:
    before = ServerCounters(100, 300, 50, 1_000_000, 5_000_000, {1: 20, 8: 30})
    after = ServerCounters(300, 1_100, 100, 3_000_000, 25_000_000, {1: 20, 8: 70, 16: 10})
    split = after.since(before)
    assert split.requests == 200
    assert split.rows == 800
    assert split.executions == 50
    assert split.mean_queue_ms == pytest.approx(0.01)  # 2 ms over 200 requests
    assert split.mean_compute_ms == pytest.approx(0.1)
    assert split.mean_batch_size == pytest.approx(16.0)
    assert split.batch_sizes == {8: 40, 16: 10}


def test_server_counters_sum_over_versions_and_splits_combine_weighted() -> None:
    total = ServerCounters.total(
        [ServerCounters(1, 2, 1, 10, 20, {2: 1}), ServerCounters(3, 4, 2, 30, 40, {2: 1, 1: 1})]
    )
    assert total == ServerCounters(4, 6, 3, 40, 60, {2: 2, 1: 1})
    combined = ServerSplit.combine(
        [
            ServerSplit(100, 100, 100, 1.0, 2.0, 1.0, {1: 100}),
            ServerSplit(300, 1200, 100, 3.0, 4.0, 12.0, {12: 100}),
        ]
    )
    assert combined.mean_queue_ms == pytest.approx(2.5)
    assert combined.mean_compute_ms == pytest.approx(3.5)
    assert combined.mean_batch_size == pytest.approx(6.5)
