"""Shedding: whether a request can still be answered before its deadline, behind the work
queued ahead of it. The batcher refuses at once (RESOURCE_EXHAUSTED) a request that cannot, so
that under overload it costs microseconds instead of waiting out its deadline in the queue, and
drops before execution a request whose batch would end after it.

Every estimate here errs towards serving: a request shed that would have made its deadline is
a refusal the client did not need. So batch times are fitted, not extrapolated from one size,
nothing is shed before a batch was measured, and nothing on an idle model.
"""

from __future__ import annotations

from inferd.core.batching.policy import BatchingPolicy


class ServiceTimeEstimate:
    """How long a batch takes from leaving the queue to its answers (hand-off included), as
    `a * rows + b`, fitted by exponentially weighted least squares over the measured batches.
    Until the batches measured differ in size enough to fit a slope, every batch is predicted
    to take the average batch time: a fixed cost often dominates, and scaling it with the rows
    would overestimate large batches many times over. (The runtime's `RunTimeEstimate`, which
    decides what runs inline on the event loop, errs the other way on purpose: there an
    underestimate is the costly mistake.)"""

    __slots__ = ("_cov", "_mean_rows", "_mean_seconds", "_var")

    # Weight of the newest batch: about the last ten count.
    WEIGHT = 0.1
    # Rows' variance below which no slope is fitted (batches of about one size).
    MIN_VARIANCE = 0.25

    def __init__(self) -> None:
        self._mean_rows: float | None = None
        self._mean_seconds = 0.0
        self._var = 0.0
        self._cov = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        if self._mean_rows is None:
            self._mean_rows, self._mean_seconds = float(rows), seconds
            return
        w = self.WEIGHT
        dx = rows - self._mean_rows
        dy = seconds - self._mean_seconds
        self._mean_rows += w * dx
        self._mean_seconds += w * dy
        self._var = (1 - w) * (self._var + w * dx * dx)
        self._cov = (1 - w) * (self._cov + w * dx * dy)

    def predict(self, rows: float) -> float | None:
        """Seconds for a batch of `rows`; None before the first batch."""
        if self._mean_rows is None:
            return None
        if self._var < self.MIN_VARIANCE or self._cov <= 0:
            return self._mean_seconds
        slope = self._cov / self._var
        return max(self._mean_seconds + slope * (rows - self._mean_rows), 0.0)


class DrainRate:
    """How fast a backlogged queue really empties, in seconds per row: measured between
    consecutive batches taken while requests were left waiting, so it counts everything that
    happens between two batches (the hand-off, assembling, answering, the event loop's other
    work), which a batch's own time does not. Forgotten when the queue empties: the next
    backlog is measured afresh."""

    __slots__ = ("_last", "_last_rows", "seconds_per_row")

    WEIGHT = 0.2

    def __init__(self) -> None:
        self.seconds_per_row: float | None = None
        self._last: float | None = None
        self._last_rows = 0

    def taken(self, now: float, rows: int, backlogged: bool) -> None:
        """A batch of `rows` rows left the queue at `now`; `backlogged`: requests still wait."""
        if self._last is not None and self._last_rows:
            sample = (now - self._last) / self._last_rows
            current = self.seconds_per_row
            self.seconds_per_row = (
                sample if current is None else current + self.WEIGHT * (sample - current)
            )
        if backlogged:
            self._last, self._last_rows = now, rows
        else:
            self._last, self._last_rows, self.seconds_per_row = None, 0, None


def expected_finish(
    policy: BatchingPolicy,
    service: ServiceTimeEstimate,
    drain: DrainRate,
    rows_ahead: int,
    rows: int,
    busy_rows: float | None,
) -> float | None:
    """Seconds until a request of `rows` rows, queued behind `rows_ahead` rows, has its answer:
    the wait for the rows ahead (the full batches ahead of it spread over the execution slots,
    plus a running batch of `busy_rows` when every slot is busy, else None; or, when longer,
    the rows ahead at the measured drain rate), then its own batch. None before any batch was
    measured."""
    limit = policy.batch_limit
    full = service.predict(limit)
    if full is None:
        return None
    wait = (rows_ahead // limit) / policy.instances * full
    if busy_rows is not None:
        wait += service.predict(busy_rows) or 0.0
    if drain.seconds_per_row is not None:
        wait = max(wait, rows_ahead * drain.seconds_per_row)
    return wait + (service.predict(min(limit, rows_ahead % limit + rows)) or 0.0)
