"""The batching policy's decisions as pure functions of plain values: when a queue may dispatch,
how much a batch takes, and which queue goes next. No batcher, no event loop, no clock but the
numbers passed in. (tests/unit/test_batcher.py pins the same rules end to end.)"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from inferd.core.batching.policy import TIMER_SLACK, ArrivalEstimate, BatchingPolicy, next_queue

# -- when a queue may dispatch ---------------------------------------------------------------


def test_full_batch_may_dispatch_before_the_delay() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=1.0)
    assert policy.dispatch_at(waiting_rows=8, oldest_arrival=10.0, now=10.0) == 10.0
    assert policy.dispatch_at(waiting_rows=9, oldest_arrival=10.0, now=10.0) == 10.0


def test_short_batch_waits_until_its_oldest_request_has_waited_the_delay() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=0.5)
    assert policy.dispatch_at(waiting_rows=7, oldest_arrival=10.0, now=10.25) == 10.5
    assert policy.dispatch_at(waiting_rows=7, oldest_arrival=10.0, now=10.5) == 10.5


def test_delay_counts_from_the_oldest_arrival_not_from_now() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=0.5)
    # The oldest request arrived at 10.0: a later look (or a later arrival) does not push it back.
    assert policy.dispatch_at(waiting_rows=1, oldest_arrival=10.0, now=10.4) == 10.5
    assert policy.dispatch_at(waiting_rows=1, oldest_arrival=10.0, now=10.6) == 10.6


def test_delay_ending_within_the_timer_slack_counts_as_elapsed() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=0.5)
    early = 10.5 - TIMER_SLACK / 2
    assert policy.dispatch_at(waiting_rows=1, oldest_arrival=10.0, now=early) == early
    too_early = 10.5 - TIMER_SLACK * 2
    assert policy.dispatch_at(waiting_rows=1, oldest_arrival=10.0, now=too_early) == 10.5


def test_zero_delay_dispatches_a_lone_request_at_once() -> None:
    policy = BatchingPolicy(max_batch_size=8)
    assert policy.dispatch_at(waiting_rows=1, oldest_arrival=3.0, now=3.0) == 3.0


def test_model_without_batch_dim_never_waits_for_a_batch() -> None:
    policy = BatchingPolicy(max_batch_size=0, max_queue_delay=1.0)
    assert policy.dispatch_at(waiting_rows=1, oldest_arrival=3.0, now=3.0) == 3.0


def test_preferred_size_at_the_head_dispatches_before_the_delay() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=1.0, preferred_batch_sizes=(4,))
    assert policy.dispatch_at(4, 0.0, 0.25, rows_in_order=[1, 1, 2]) == 0.25
    assert policy.dispatch_at(3, 0.0, 0.25, rows_in_order=[1, 2]) == 1.0, "3 rows: not 4"
    assert policy.dispatch_at(5, 0.0, 0.25, rows_in_order=[2, 3]) == 1.0, "2 then 5: never 4"


def test_draining_dispatches_without_waiting_for_a_batch_to_fill() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=1.0)
    assert policy.dispatch_at(1, 0.0, 0.25, draining=True) == 0.25


# -- the preferred size a queue's head can form ----------------------------------------------


@pytest.mark.parametrize(
    ("rows_in_order", "requests"),
    [
        ([1, 1, 1, 1, 1, 1], 4),  # 2 and 4 reachable: the larger
        ([2, 2, 1], 2),  # rows, not requests: 2 requests make 4 rows
        ([3, 1, 4], 2),  # 3, 4 (preferred), 8 is over max_batch_size 6
        ([3, 3], None),  # 3, 6: neither preferred
        ([5, 1], None),  # 5, 6
        ([], None),
    ],
)
def test_preferred_prefix_is_the_largest_preferred_size_reachable(
    rows_in_order: list[int], requests: int | None
) -> None:
    policy = BatchingPolicy(max_batch_size=6, preferred_batch_sizes=(2, 4))
    assert policy.preferred_prefix(rows_in_order) == requests


def test_preferred_prefix_never_reaches_past_max_batch_size() -> None:
    policy = BatchingPolicy(max_batch_size=4, preferred_batch_sizes=(4,))
    assert policy.preferred_prefix([3, 2]) is None
    assert policy.preferred_prefix([3, 1, 2]) == 2


def test_decisions_read_only_the_head_of_a_long_queue() -> None:
    """The batcher hands over its queue lazily: a decision must not walk all of it."""

    def queue_of_ones() -> Iterator[int]:
        """1000 requests of one row each; reading past the 8th fails the test."""
        for position in range(1000):
            assert position < 8, "read far past max_batch_size rows"
            yield 1

    policy = BatchingPolicy(max_batch_size=4, max_queue_delay=1.0, preferred_batch_sizes=(2,))
    assert policy.preferred_prefix(queue_of_ones()) == 2
    assert policy.dispatch_at(3, 0.0, 0.5, rows_in_order=queue_of_ones()) == 0.5
    assert policy.batch_size(1000, 0.0, 0.5, rows_in_order=queue_of_ones()) == 4


# -- what a batch takes ----------------------------------------------------------------------


def test_batch_takes_as_many_requests_as_fit_in_max_batch_size() -> None:
    policy = BatchingPolicy(max_batch_size=8)
    assert policy.batch_size(9, 0.0, 0.0, rows_in_order=[3, 3, 3]) == 2
    assert policy.batch_size(8, 0.0, 0.0, rows_in_order=[3, 5, 1]) == 2
    assert policy.batch_size(3, 0.0, 0.0, rows_in_order=[1, 1, 1]) == 3


def test_batch_takes_skip_no_request_to_fill_up() -> None:
    """Dispatch order is kept: a smaller request behind one that does not fit waits."""
    policy = BatchingPolicy(max_batch_size=8)
    assert policy.batch_size(12, 0.0, 0.0, rows_in_order=[6, 4, 2]) == 1


def test_batch_always_takes_at_least_one_request() -> None:
    policy = BatchingPolicy(max_batch_size=4)
    assert policy.batch_size(6, 0.0, 0.0, rows_in_order=[6]) == 1


def test_model_without_batch_dim_runs_each_request_alone() -> None:
    policy = BatchingPolicy(max_batch_size=0)
    assert policy.batch_size(3, 0.0, 0.0, rows_in_order=[1, 1, 1]) == 1


def test_batch_stops_at_the_preferred_size_while_the_delay_runs() -> None:
    policy = BatchingPolicy(max_batch_size=16, max_queue_delay=1.0, preferred_batch_sizes=(4,))
    assert policy.batch_size(6, 0.0, 0.5, rows_in_order=[1] * 6) == 4


def test_batch_takes_everything_that_fits_once_the_delay_ran_out() -> None:
    policy = BatchingPolicy(max_batch_size=16, max_queue_delay=1.0, preferred_batch_sizes=(4,))
    assert policy.batch_size(6, 0.0, 1.0, rows_in_order=[1] * 6) == 6


def test_full_batch_waiting_ignores_preferred_sizes() -> None:
    policy = BatchingPolicy(max_batch_size=4, max_queue_delay=1.0, preferred_batch_sizes=(2,))
    assert policy.batch_size(5, 0.0, 0.0, rows_in_order=[1] * 5) == 4


def test_batch_without_a_reachable_preferred_size_takes_everything_waiting() -> None:
    policy = BatchingPolicy(max_batch_size=16, max_queue_delay=1.0, preferred_batch_sizes=(4,))
    assert policy.batch_size(6, 0.0, 0.5, rows_in_order=[3, 3]) == 2


def test_batch_never_holds_more_than_max_batch_size_rows_unless_one_request_does() -> None:
    rng = random.Random(7)
    for _ in range(500):
        max_batch_size = rng.randint(1, 16)
        sizes = range(1, max_batch_size + 1)
        preferred = tuple(sorted(rng.sample(sizes, rng.randint(0, min(2, len(sizes))))))
        policy = BatchingPolicy(
            max_batch_size=max_batch_size, max_queue_delay=1.0, preferred_batch_sizes=preferred
        )
        rows = [rng.randint(1, max_batch_size) for _ in range(rng.randint(1, 10))]
        now = rng.choice([0.0, 2.0])
        taken = policy.batch_size(sum(rows), 0.0, now, rows_in_order=rows)
        assert 1 <= taken <= len(rows)
        assert taken == 1 or sum(rows[:taken]) <= max_batch_size, (policy, rows, taken)
        if taken < len(rows) and sum(rows[:taken]) + rows[taken] <= max_batch_size:
            # Room was left: only a preferred size, while the delay runs, stops a batch short.
            assert now < 1.0 and sum(rows[:taken]) in preferred, (policy, rows, taken)


# -- which queue goes next -------------------------------------------------------------------


def test_ready_queue_with_the_oldest_request_goes_first() -> None:
    queues = [("young", 2.0, 5.0), ("old", 1.0, 5.0), ("older", 0.5, 5.0)]
    assert next_queue(queues, now=5.0) == ("older", None)


def test_queues_that_are_not_ready_are_passed_over_however_old() -> None:
    queues = [("old-not-ready", 0.0, 9.0), ("young-ready", 4.0, 5.0)]
    assert next_queue(queues, now=5.0) == ("young-ready", None)


def test_with_no_queue_ready_look_again_when_the_first_becomes_ready() -> None:
    queues = [("a", 0.0, 9.0), ("b", 1.0, 7.0), ("c", 2.0, 8.0)]
    assert next_queue(queues, now=5.0) == (None, 7.0)


def test_with_nothing_waiting_there_is_nothing_to_wake_for() -> None:
    assert next_queue([], now=5.0) == (None, None)


# -- the arrival estimate (adaptive_delay) ------------------------------------------------------


def test_no_arrival_estimate_before_a_gap_is_known() -> None:
    estimate = ArrivalEstimate(max_queue_delay=1.0)
    assert estimate.next_arrival() is None
    estimate.arrived(3.0)
    assert estimate.next_arrival() is None
    estimate.arrived(3.5)
    assert estimate.next_arrival() == pytest.approx(4.0)


def test_arrival_gaps_count_up_to_twice_the_delay() -> None:
    estimate = ArrivalEstimate(max_queue_delay=1.0)
    estimate.arrived(0.0)
    estimate.arrived(600.0)  # a quiet ten minutes counts as a 2 s gap
    assert estimate.next_arrival() == pytest.approx(602.0)


def test_the_estimate_follows_the_recent_gaps() -> None:
    estimate = ArrivalEstimate(max_queue_delay=1.0)
    now = 0.0
    estimate.arrived(now)
    for _ in range(5):
        now += 1.5
        estimate.arrived(now)
    for _ in range(60):
        now += 0.1
        estimate.arrived(now)
    assert estimate.next_arrival() == pytest.approx(now + 0.1, abs=0.01)


def test_a_batch_not_expected_to_grow_in_time_dispatches_now() -> None:
    policy = BatchingPolicy(max_batch_size=8, max_queue_delay=1.0)
    assert policy.dispatch_at(1, 0.0, 0.2, next_arrival=1.5) == 0.2
    assert policy.dispatch_at(1, 0.0, 0.2, next_arrival=0.9) == pytest.approx(1.0)
    assert policy.dispatch_at(1, 0.0, 0.2, next_arrival=None) == pytest.approx(1.0)
