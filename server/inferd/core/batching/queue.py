"""What waits: requests queued for a batch, grouped by shape, FIFO within priority levels."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Iterator

from inferd.core.batching.policy import BatchingPolicy
from inferd.core.types import InferRequest, InferResult, rows_of, shape_key_of

TIMER_SLACK = 1e-6


class EntryState(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    # Left the queue without running: its caller gave up.
    GONE = 3


class QueuedRequest:
    __slots__ = ("arrival", "future", "key", "priority", "reported", "request", "rows", "state")

    def __init__(
        self,
        request: InferRequest,
        future: asyncio.Future[InferResult],
        arrival: float,
        priority: int,
        batches: bool,
    ) -> None:
        self.request = request
        self.future = future
        self.arrival = arrival
        self.priority = priority
        self.rows = rows_of(request.inputs, batches)
        self.key = shape_key_of(request.inputs, batches)
        self.state = EntryState.QUEUED
        # Whether an observer has been told of its outcome (a report or a rejection).
        self.reported = False


class ShapeQueue:
    """Requests that can share a batch, FIFO within each priority level."""

    def __init__(self) -> None:
        self.levels: dict[int, deque[QueuedRequest]] = {}
        self.rows = 0
        self.count = 0

    def push(self, entry: QueuedRequest) -> None:
        self.levels.setdefault(entry.priority, deque()).append(entry)
        self.rows += entry.rows
        self.count += 1

    def remove(self, entry: QueuedRequest) -> None:
        level = self.levels[entry.priority]
        level.remove(entry)
        if not level:
            del self.levels[entry.priority]
        self.rows -= entry.rows
        self.count -= 1

    def in_order(self) -> Iterator[QueuedRequest]:
        for priority in sorted(self.levels):
            yield from self.levels[priority]

    def oldest_arrival(self) -> float:
        # Within a level arrival order holds, so the oldest request is one of the heads.
        return min(level[0].arrival for level in self.levels.values())

    def readiness(self, policy: BatchingPolicy, now: float) -> tuple[bool, float]:
        """(ready now, else the loop time at which the delay makes it ready)."""
        ready_at = self.oldest_arrival() + policy.max_queue_delay
        # asyncio fires a timer up to its clock resolution early, and float sums land a hair
        # short; without the slack the dispatcher would wake, find nothing ready, and spin.
        if (
            policy.max_batch_size == 0
            or self.rows >= policy.max_batch_size
            or ready_at <= now + TIMER_SLACK
        ):
            return True, now
        if policy.preferred_batch_sizes and self._preferred_prefix(policy) is not None:
            return True, now
        return False, ready_at

    def _preferred_prefix(self, policy: BatchingPolicy) -> int | None:
        """Requests (in dispatch order) that make up the largest preferred size reachable."""
        best: int | None = None
        rows = 0
        for n, entry in enumerate(self.in_order(), start=1):
            rows += entry.rows
            if rows > policy.max_batch_size:
                break
            if rows in policy.preferred_batch_sizes:
                best = n
        return best

    def take(self, policy: BatchingPolicy, now: float) -> list[QueuedRequest]:
        """Remove and return the next batch: dispatch order, as many rows as fit."""
        limit: int | None = None
        if (
            policy.preferred_batch_sizes
            and self.rows < policy.max_batch_size
            and self.oldest_arrival() + policy.max_queue_delay > now + TIMER_SLACK
        ):
            limit = self._preferred_prefix(policy)
        batch: list[QueuedRequest] = []
        rows = 0
        for entry in self.in_order():
            if batch and (rows + entry.rows > policy.batch_limit or len(batch) == limit):
                break
            batch.append(entry)
            rows += entry.rows
        for entry in batch:
            self.remove(entry)
        return batch
