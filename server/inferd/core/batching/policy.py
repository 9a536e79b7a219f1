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
    ) -> float:
        """When a queue may dispatch (given a free slot): `now` if it may now, else the loop time
        at which its oldest request will have waited max_queue_delay.

        It may dispatch now when the batcher is draining (nothing waits for a batch to fill),
        the model has no batch dim (nothing to fill), a full batch waits, the delay has run out,
        or the requests at its head make up a preferred size. `rows_in_order` is read only with
        preferred sizes."""
        if (
            draining
            or self.max_batch_size == 0
            or waiting_rows >= self.max_batch_size
            or self.delay_elapsed(oldest_arrival, now)
        ):
            return now
        if self.preferred_batch_sizes and self.preferred_prefix(rows_in_order) is not None:
            return now
        return oldest_arrival + self.max_queue_delay

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
