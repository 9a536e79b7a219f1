"""What waits: requests queued for a batch, grouped by shape, FIFO within priority levels.

When a queue dispatches and how much of it a batch takes is the policy's (`batching/policy.py`).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections import deque
from collections.abc import Iterator

from inferd.core.types import InferRequest, InferResult, rows_of, shape_key_of


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

    def rows_in_order(self) -> Iterator[int]:
        """Each request's rows, in dispatch order: what the policy decides from."""
        for entry in self.in_order():
            yield entry.rows

    def take(self, count: int) -> list[QueuedRequest]:
        """Remove and return the first `count` requests in dispatch order."""
        batch = list(itertools.islice(self.in_order(), count))
        for entry in batch:
            self.remove(entry)
        return batch
