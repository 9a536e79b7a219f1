"""When a request would be answered, behind the work queued ahead of it
(`core/batching/shedding.py`): plain values, no batcher."""

from __future__ import annotations

import pytest

from inferd.core.batching.policy import BatchingPolicy
from inferd.core.batching.shedding import DrainRate, ServiceTimeEstimate, expected_finish


def fitted(*batches: tuple[int, float]) -> ServiceTimeEstimate:
    service = ServiceTimeEstimate()
    for rows, seconds in batches:
        service.observe(rows, seconds)
    return service


def test_nothing_is_predicted_before_a_batch_was_measured() -> None:
    policy = BatchingPolicy(max_batch_size=4)
    assert ServiceTimeEstimate().predict(4) is None
    assert expected_finish(policy, ServiceTimeEstimate(), DrainRate(), 100, 1, 1.0) is None


def test_batches_of_one_size_predict_their_average_whatever_the_rows() -> None:
    # A 10 ms fixed cost measured at one row must not become 320 ms at 32 rows.
    service = fitted(*[(1, 0.0101)] * 5)
    assert service.predict(32) == pytest.approx(0.0101)


def test_batches_of_several_sizes_fit_a_fixed_cost_and_a_cost_per_row() -> None:
    # 10 ms + 0.1 ms a row.
    service = fitted(*[(rows, 0.010 + 0.0001 * rows) for rows in (1, 32, 8, 16, 1, 32) * 10])
    assert service.predict(32) == pytest.approx(0.0132, rel=0.02)
    assert service.predict(1) == pytest.approx(0.0101, rel=0.02)


def test_expected_finish_counts_full_batches_ahead_over_the_slots_and_a_running_one() -> None:
    service = fitted((4, 0.1))  # one size measured: every batch 100 ms
    one_slot = BatchingPolicy(max_batch_size=4)
    two_slots = BatchingPolicy(max_batch_size=4, instances=2)
    # 8 rows ahead = 2 full batches, plus the running one, plus its own.
    assert expected_finish(one_slot, service, DrainRate(), 8, 1, 4.0) == pytest.approx(0.4)
    assert expected_finish(two_slots, service, DrainRate(), 8, 1, 4.0) == pytest.approx(0.3)
    assert expected_finish(one_slot, service, DrainRate(), 0, 1, None) == pytest.approx(0.1)


def test_a_measured_drain_rate_slower_than_the_batches_is_what_a_request_waits_behind() -> None:
    service = fitted((4, 0.1))
    drain = DrainRate()
    drain.taken(0.0, 4, backlogged=True)
    drain.taken(0.2, 4, backlogged=True)  # batches leave every 200 ms, not 100: 50 ms a row
    assert drain.seconds_per_row == pytest.approx(0.05)
    policy = BatchingPolicy(max_batch_size=4)
    assert expected_finish(policy, service, drain, 8, 1, None) == pytest.approx(0.5)


def test_the_drain_rate_is_measured_between_backlogged_batches_and_forgotten_when_idle() -> None:
    drain = DrainRate()
    drain.taken(0.0, 4, backlogged=False)
    drain.taken(5.0, 4, backlogged=True)  # the queue was idle in between: no sample
    assert drain.seconds_per_row is None
    drain.taken(5.2, 4, backlogged=False)
    assert drain.seconds_per_row is None, "an emptied queue forgets its drain rate"
