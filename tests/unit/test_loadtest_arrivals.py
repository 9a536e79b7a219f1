"""The open-loop scheduler sends every request at its intended time, on looptime's fake clock,
and never skips one when it falls behind (no coordinated omission)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from inferd.loadtest.arrivals import (
    OpenLoopScheduler,
    arrivals,
    constant_arrivals,
    poisson_arrivals,
)
from inferd.loadtest.levels import closed_levels, open_levels
from inferd.loadtest.runner import MeasurementPlan, WorkerPool

# 1/64 s: exact as a float and as looptime's whole microseconds... to within its rounding.
GAP = 1 / 64
RATE = 64.0


def test_constant_arrivals_are_evenly_spaced_from_the_phase() -> None:
    offsets = list(itertools.islice(constant_arrivals(RATE, phase=0.5), 4))
    assert offsets == [0.5, 0.5 + GAP, 0.5 + 2 * GAP, 0.5 + 3 * GAP]


def test_worker_phases_interleave_into_one_evenly_spaced_stream() -> None:
    workers = 4
    total_rate = 400.0
    streams = [
        list(itertools.islice(constant_arrivals(total_rate / workers, i / total_rate), 50))
        for i in range(workers)
    ]
    merged = np.sort(np.concatenate(streams))
    np.testing.assert_allclose(np.diff(merged), 1 / total_rate)


def test_poisson_arrivals_have_the_asked_rate_and_repeat_with_the_seed() -> None:
    a = np.array(list(itertools.islice(poisson_arrivals(1000.0, seed=3), 20_000)))
    b = np.array(list(itertools.islice(poisson_arrivals(1000.0, seed=3), 20_000)))
    np.testing.assert_array_equal(a, b)
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1e-3, rel=0.03)
    assert gaps.std() == pytest.approx(1e-3, rel=0.05)  # exponential: std == mean


def test_unknown_arrival_process_or_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="constant"):
        arrivals("bursty", 10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        constant_arrivals(0.0)


@pytest.mark.looptime
async def test_scheduler_sends_each_request_at_its_intended_time() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time() + 1.0
    sends: list[tuple[float, float]] = []

    async def send(intended: float) -> None:
        sends.append((intended, loop.time()))
        await asyncio.sleep(GAP / 4)  # a fast server

    stop = asyncio.Event()
    scheduler = OpenLoopScheduler(send, constant_arrivals(RATE), max_in_flight=8)
    loop.call_at(start + 10 * GAP - GAP / 2, stop.set)
    await scheduler.run(start, stop)
    await scheduler.drain(1.0)
    assert [intended for intended, _ in sends] == pytest.approx(
        [start + k * GAP for k in range(10)]
    )
    assert [sent - intended for intended, sent in sends] == pytest.approx([0.0] * 10, abs=1e-6)


@pytest.mark.looptime
async def test_stalled_server_delays_sends_but_none_is_skipped_and_lag_is_kept() -> None:
    """A server that takes 4 gaps per request with one request allowed in flight: the
    scheduler falls behind, sends every request late, and each one keeps its intended time."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sends: list[tuple[float, float]] = []

    async def send(intended: float) -> None:
        sends.append((intended, loop.time()))
        await asyncio.sleep(4 * GAP)

    stop = asyncio.Event()
    scheduler = OpenLoopScheduler(send, constant_arrivals(RATE), max_in_flight=1)
    loop.call_at(start + 1.0, stop.set)
    await scheduler.run(start, stop)
    await scheduler.drain(1.0)
    intended = [i for i, _ in sends]
    assert intended == pytest.approx([start + k * GAP for k in range(len(sends))])
    lags = [sent - i for i, sent in sends]
    assert lags[0] == pytest.approx(0.0, abs=1e-6)
    # Each request waits for the one before: the lag grows by 3 gaps per request.
    assert lags[1:4] == pytest.approx([3 * GAP, 6 * GAP, 9 * GAP], abs=1e-6)
    assert scheduler.sent == len(sends)


@pytest.mark.looptime
async def test_drain_cancels_requests_still_outstanding_after_the_grace_period() -> None:
    loop = asyncio.get_running_loop()

    async def send(intended: float) -> None:
        await asyncio.sleep(100.0)

    stop = asyncio.Event()
    scheduler = OpenLoopScheduler(send, constant_arrivals(RATE), max_in_flight=3)
    loop.call_later(1.0, stop.set)
    await scheduler.run(loop.time(), stop)
    assert await scheduler.drain(0.5) == 3


def test_levels_parse_and_label() -> None:
    assert [lv.label for lv in closed_levels("1,4,16")] == ["c=1", "c=4", "c=16"]
    assert [lv.label for lv in open_levels("250,1000", "poisson")] == [
        "250/s poisson",
        "1000/s poisson",
    ]
    with pytest.raises(ValueError):
        closed_levels("1.5")
    with pytest.raises(ValueError):
        open_levels("0", "constant")


def test_a_level_uses_as_few_workers_as_carry_it() -> None:
    pool = WorkerPool.__new__(WorkerPool)
    pool.size = 3
    (small,) = closed_levels("7")
    assert [(w, c) for w, c, _, _ in pool.shares(small)] == [(0, 7)]
    (large,) = closed_levels("40")
    assert [(w, c) for w, c, _, _ in pool.shares(large)] == [(0, 14), (1, 13), (2, 13)]
    (huge,) = closed_levels("200")
    assert [c for _, c, _, _ in pool.shares(huge)] == [67, 67, 66]
    (slow,) = open_levels("300", "constant")
    assert [(w, r) for w, _, r, _ in pool.shares(slow)] == [(0, 300.0)]
    (fast,) = open_levels("3000", "constant")
    shares = pool.shares(fast)
    assert [r for _, _, r, _ in shares] == pytest.approx([1000.0] * 3)
    assert [p for _, _, _, p in shares] == pytest.approx([0.0, 1 / 3000, 2 / 3000])


def test_every_level_is_bounded_in_time() -> None:
    plan = MeasurementPlan(warmup_s=2, window_s=5, max_windows=6, drain_s=5)
    assert plan.time_bound_s() < 2 + 5 * 6 + 5 + 10
    fixed = MeasurementPlan(duration_s=7.0, window_s=2.0)
    assert fixed.windows_for_duration() == (4, 1.75)
