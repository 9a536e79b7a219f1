"""When a batch closes and what it takes: the batcher's knobs, what each costs and buys, and the
decisions made from them.

The decisions are pure functions of plain values (rows waiting, arrival times, the loop's
clock), so the policy can be read, changed and unit-tested without the batcher's tasks, timers
and futures (`batching/batcher.py`) or its queues (`batching/queue.py`). The batcher asks them
only while it holds a free execution slot: a ready queue never waits for anything but a slot,
and a lone request on an idle slot (with no delay configured) is dispatched at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

# asyncio fires a timer up to its clock resolution early, and float sums land a hair short;
# without the slack the dispatcher would wake, find nothing ready, and spin.
TIMER_SLACK = 1e-6

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    max_batch_size: int
    """Most rows in one executed batch; 0 for a model without a batch dim (each request runs
    alone, as sent). Larger batches buy throughput per execution and cost the latency of the
    longer run, and of waiting for rows to arrive."""

    max_queue_delay: float = 0.0
    """Seconds the oldest waiting request may wait for a batch to fill. 0 dispatches whatever is
    queued as soon as an execution slot is free, so batches still form under load (while every
    slot is busy) and an idle server adds no latency. Raising it fills batches at low load at the
    cost of up to this much added latency per request."""

    adaptive_delay: bool = True
    """Stop holding a batch open when the next request is not expected before max_queue_delay
    runs out (`ArrivalEstimate`): waiting then adds latency and fills nothing. At one request at
    a time it measured 1.44x the throughput and 0.62x the p99 of waiting out the delay (demo mlp,
    200 µs, c=1; unchanged at c=8: docs/benchmarks.md). Off: every batch waits out the delay
    unless it fills, as in Triton."""

    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes dispatched as soon as they can be formed, without waiting for the delay (e.g.
    sizes the runtime is fastest at). Empty: only a full batch or the delay dispatches."""

    max_queue_size: int = 1024
    """Requests that may wait (not counting those executing). A full queue answers
    RESOURCE_EXHAUSTED at once: a bounded wait instead of unbounded latency under overload."""

    instances: int = 1
    """Batches in flight at once. More overlap the Python work of one batch with the execution
    of another (and on a GPU, kernels of several), at the cost of memory per slot and smaller
    batches at moderate load."""

    default_priority: int = 1
    """The level of a request that names none (priority 0). Smaller levels run first."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        if self.max_queue_delay < 0:
            raise ValueError("max_queue_delay must be >= 0")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= max(self.max_batch_size, 1):
                raise ValueError(
                    f"preferred batch size {size} is outside 1..max_batch_size "
                    f"({self.max_batch_size})"
                )

    @property
    def batch_limit(self) -> int:
        """Rows one execution may hold: a model without a batch dim runs requests one by one."""
        return self.max_batch_size if self.max_batch_size > 0 else 1

    # -- decisions, over plain values --------------------------------------------------------
    #
    # A queue is described by `waiting_rows` (rows of every request in it), `oldest_arrival`
    # (loop time its oldest request arrived) and `rows_in_order` (each request's rows, in
    # dispatch order: priority level, then arrival). `now` is the loop's clock.

    def delay_elapsed(self, oldest_arrival: float, now: float) -> bool:
        """Whether the oldest waiting request has waited max_queue_delay."""
        return oldest_arrival + self.max_queue_delay <= now + TIMER_SLACK

    def dispatch_at(
        self,
        waiting_rows: int,
        oldest_arrival: float,
        now: float,
        rows_in_order: Iterable[int] = (),
        draining: bool = False,
        next_arrival: float | None = None,
    ) -> float:
        """When a queue may dispatch (given a free slot): `now` if it may now, else the loop time
        at which its oldest request will have waited max_queue_delay.

        It may dispatch now when the batcher is draining (nothing waits for a batch to fill),
        the model has no batch dim (nothing to fill), a full batch waits, the delay has run out,
        the next request is not expected before the delay runs out (`next_arrival`, from
        `ArrivalEstimate`: waiting would only add latency), or the requests at its head make up
        a preferred size. `rows_in_order` is read only with preferred sizes."""
        deadline = oldest_arrival + self.max_queue_delay
        if (
            draining
            or self.max_batch_size == 0
            or waiting_rows >= self.max_batch_size
            or self.delay_elapsed(oldest_arrival, now)
            or (next_arrival is not None and next_arrival > deadline)
        ):
            return now
        if self.preferred_batch_sizes and self.preferred_prefix(rows_in_order) is not None:
            return now
        return deadline

    def preferred_prefix(self, rows_in_order: Iterable[int]) -> int | None:
        """How many requests from the head make up the largest preferred size reachable within
        max_batch_size rows; None when none is."""
        best: int | None = None
        rows = 0
        for count, request_rows in enumerate(rows_in_order, start=1):
            rows += request_rows
            if rows > self.max_batch_size:
                break
            if rows in self.preferred_batch_sizes:
                best = count
        return best

    def batch_size(
        self,
        waiting_rows: int,
        oldest_arrival: float,
        now: float,
        rows_in_order: Iterable[int],
    ) -> int:
        """How many requests from the head the next batch takes (at least one): while the delay
        runs and no full batch waits, the largest preferred size that can be formed, if one
        can; otherwise as many as fit in batch_limit rows."""
        waiting = rows_in_order
        limit: int | None = None
        if (
            self.preferred_batch_sizes
            and waiting_rows < self.max_batch_size
            and not self.delay_elapsed(oldest_arrival, now)
        ):
            # Fewer than max_batch_size rows wait: a short list, read twice.
            waiting = list(rows_in_order)
            limit = self.preferred_prefix(waiting)
        taken = rows = 0
        for request_rows in waiting:
            if taken and (rows + request_rows > self.batch_limit or taken == limit):
                break
            taken += 1
            rows += request_rows
        return taken


class ArrivalEstimate:
    """When the next request is expected: the last arrival plus a moving average of the gaps
    between arrivals.

    It lets a batch that is not coming stop holding the requests that wait for it: at one
    request at a time (a client in a loop, or a quiet hour), each would otherwise sit out the
    whole max_queue_delay on an idle slot. Gaps count up to `cap` (twice the delay), so one quiet
    minute does not make the next burst look sparse for long; before two arrivals there is no
    estimate and the delay applies as configured."""

    __slots__ = ("_cap", "_gap", "_last")

    # Weight of the newest gap: about the last ten arrivals count.
    WEIGHT = 0.1

    def __init__(self, max_queue_delay: float) -> None:
        self._cap = 2 * max_queue_delay
        self._last: float | None = None
        self._gap: float | None = None

    def arrived(self, now: float) -> None:
        if self._last is not None:
            gap = min(now - self._last, self._cap)
            self._gap = gap if self._gap is None else self._gap + self.WEIGHT * (gap - self._gap)
        self._last = now

    def next_arrival(self) -> float | None:
        if self._last is None or self._gap is None:
            return None
        return self._last + self._gap


def next_queue(
    queues: Iterable[tuple[K, float, float]], now: float
) -> tuple[K | None, float | None]:
    """Which queue dispatches next, of queues given as (key, oldest arrival, dispatch_at):
    of those ready (dispatch_at <= now), the one whose oldest request arrived first, so that
    shapes take turns by age and none starves. With none ready: (None, the earliest
    dispatch_at), when to look again; (None, None) when nothing waits."""
    chosen: K | None = None
    chosen_arrival = 0.0
    wake_at: float | None = None
    for key, oldest_arrival, at in queues:
        if at <= now:
            if chosen is None or oldest_arrival < chosen_arrival:
                chosen, chosen_arrival = key, oldest_arrival
        elif wake_at is None or at < wake_at:
            wake_at = at
    return chosen, None if chosen is not None else wake_at
