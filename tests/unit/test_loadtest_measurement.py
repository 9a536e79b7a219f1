"""When a load level counts as measured: three agreeing windows, or the bounds."""

from __future__ import annotations

from collections import Counter

import numpy as np

from inferd.loadtest.completions import MergedWindow
from inferd.loadtest.runner import MeasurementPlan, measured_yet


def window(
    index: int, requests: int, median_ms: float = 2.0, duration: float = 1.0
) -> MergedWindow:
    return MergedWindow(
        index=index,
        duration=duration,
        latencies=np.full(requests, median_ms / 1e3),
        rows=requests,
        errors=Counter(),
        send_lags=np.empty(0),
    )


def windows(*requests: int) -> list[MergedWindow]:
    return [window(i, r) for i, r in enumerate(requests)]


PLAN = MeasurementPlan(window_s=1.0, tolerance=0.10, stable_windows=3, max_windows=5)


def test_level_goes_on_until_three_windows_agree() -> None:
    assert measured_yet(windows(500, 1000), PLAN) is None
    assert measured_yet(windows(500, 1000, 1020), PLAN) is None
    assert measured_yet(windows(500, 1000, 1020, 980), PLAN) == ("3 windows agree within 10%", True)


def test_windows_must_agree_on_median_latency_too() -> None:
    drifting = [window(0, 1000, 2.0), window(1, 1000, 2.0), window(2, 1000, 3.0)]
    assert measured_yet(drifting, PLAN) is None


def test_level_stops_unstable_after_max_windows() -> None:
    assert measured_yet(windows(100, 300, 100, 300, 100), PLAN) == (
        "not stable after 5 windows",
        False,
    )


def test_fixed_count_and_fixed_duration_replace_the_stability_rule() -> None:
    by_count = MeasurementPlan(count=2500)
    assert measured_yet(windows(1000, 1000), by_count) is None
    assert measured_yet(windows(1000, 1000, 600), by_count) == ("request count reached", True)
    by_duration = MeasurementPlan(window_s=1.0, duration_s=2.0)
    assert measured_yet(windows(10), by_duration) is None
    assert measured_yet(windows(10, 5000), by_duration) == ("duration reached", True)
