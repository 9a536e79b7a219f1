"""The dynamic batcher, driven by a fake executor on looptime's fake loop clock: no gRPC, no ORT.

Every async test runs with `loop.time()` starting at 0; sleeps and timeouts complete at once in
real time while the loop's clock jumps forward, so the timings asserted here are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytest

from inferd.core.batching.batcher import Batcher, BatchingPolicy, BatchRun
from inferd.core.errors import (
    DeadlineExceeded,
    InferdError,
    InferenceFailed,
    InvalidInput,
    QueueFull,
    Unavailable,
)
from inferd.core.observer import BatchReport, MultiObserver, Observer, RejectReason
from inferd.core.statistics import StatisticsRecorder, VersionStatistics
from inferd.core.types import Array, InferRequest, InferResult

pytestmark = pytest.mark.looptime

# A virtual-time bound on every wait: a request that is never answered fails the test at once
# (in real time) instead of hanging until pytest-timeout.
HANG = 1000.0

T = TypeVar("T")

# 1/64 s: a binary fraction that is also a whole number of microseconds (looptime's resolution).
TICK = 1 / 64


@dataclass
class ExecutedBatch:
    """What the fake executor saw of one batch."""

    started: float
    inputs: list[Mapping[str, Array]]
    outputs: tuple[str, ...]
    finished: float | None = None
    failed: bool = False
    inline: bool = False

    @property
    def ids(self) -> list[int]:
        """Each request's id: the value its `x` is filled with."""
        return [int(part["x"].flat[0]) for part in self.inputs]

    @property
    def rows(self) -> int:
        return sum(int(part["x"].shape[0]) for part in self.inputs)


@dataclass
class FakeExecutor:
    """Answers y = 2x and z = x + 1 per request after `cost` seconds of loop time.

    `cost` and `fail` may be callables of the batch, for randomized runs; `fail` is an exception
    to raise; `drop_one` returns one result too few. `inline_rows` > 0 runs batches of up to
    that many rows inline (`run_inline`, no loop time passes); others go through `execute`.
    """

    cost: float | Callable[[Sequence[Mapping[str, Array]]], float] = 0.0
    fail: BaseException | Callable[[Sequence[Mapping[str, Array]]], BaseException | None] | None = (
        None
    )
    drop_one: bool = False
    check: Callable[[Sequence[Mapping[str, Array]]], None] | None = None
    batches: list[ExecutedBatch] = field(default_factory=list)
    running: int = 0
    most_running: int = 0
    inline_rows: int = 0

    def run_inline(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun | None:
        if sum(int(part["x"].shape[0]) for part in batch) > self.inline_rows:
            return None
        loop = asyncio.get_running_loop()
        record = ExecutedBatch(loop.time(), list(batch), tuple(outputs), inline=True)
        self.batches.append(record)
        record.finished = loop.time()
        return self._answer(batch, outputs, record, 0.0)

    async def execute(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun:
        loop = asyncio.get_running_loop()
        record = ExecutedBatch(loop.time(), list(batch), tuple(outputs))
        self.batches.append(record)
        if self.check is not None:
            self.check(batch)
        # Every batch the batcher forms must be concatenable along dim 0, as the runtime does.
        np.concatenate([part["x"] for part in batch])
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        cost = self.cost(batch) if callable(self.cost) else self.cost
        try:
            await asyncio.sleep(cost)
        finally:
            self.running -= 1
            record.finished = loop.time()
        return self._answer(batch, outputs, record, cost)

    def _answer(
        self,
        batch: Sequence[Mapping[str, Array]],
        outputs: Sequence[str],
        record: ExecutedBatch,
        cost: float,
    ) -> BatchRun:
        error = self.fail(batch) if callable(self.fail) else self.fail
        if error is not None:
            record.failed = True
            raise error
        names = tuple(outputs) or ("y", "z")
        results = [
            {n: v for n, v in (("y", part["x"] * 2), ("z", part["x"] + 1)) if n in names}
            for part in batch
        ]
        return BatchRun(results[:-1] if self.drop_one else results, infer_time=cost)


class RecordingObserver(Observer):
    def __init__(self) -> None:
        self.rejections: list[RejectReason] = []
        self.depths: list[int] = []
        self.reports: list[BatchReport] = []

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        self.rejections.append(reason)

    def batch_finished(self, report: BatchReport) -> None:
        self.reports.append(report)

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        self.depths.append(depth)


def request(
    ident: int,
    rows: int = 1,
    cols: int = 2,
    *,
    deadline: float | None = None,
    priority: int = 0,
    outputs: tuple[str, ...] = (),
) -> InferRequest:
    return InferRequest(
        model="m",
        inputs={"x": np.full((rows, cols), ident, np.float32)},
        outputs=outputs,
        deadline=deadline,
        priority=priority,
    )


def now() -> float:
    return asyncio.get_running_loop().time()


def make_batcher(
    executor: FakeExecutor, observer: Observer | None = None, **policy: Any
) -> Batcher:
    # Fake loop clock: the fine timer's sleeping thread would keep real time. The delay is
    # waited out as configured unless a test turns the arrival estimate on.
    policy.setdefault("adaptive_delay", False)
    return Batcher("m", 1, BatchingPolicy(**policy), executor, observer, fine_timer=False)


def submit_at(batcher: Batcher, at: float, req: InferRequest) -> asyncio.Task[InferResult]:
    """Submit `req` at loop time `at`, in a task of its own (a caller)."""

    async def caller() -> InferResult:
        await asyncio.sleep(at - now())
        return await batcher.submit(req)

    return asyncio.get_running_loop().create_task(caller())


async def settle(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(HANG):
        return await awaitable


async def answers(tasks: Sequence[asyncio.Task[InferResult]]) -> list[Any]:
    """Each task's result, or the exception it ended with; fails the test if one hangs."""
    return await settle(asyncio.gather(*tasks, return_exceptions=True))


@contextlib.contextmanager
def cancel_if_the_loop_spins(task: asyncio.Task[Any], seconds: float = 0.5) -> Iterator[None]:
    """Cancel `task` from another thread after `seconds` of real time: the way out of a loop that
    spins without letting looptime's clock advance (nothing inside the loop could end it)."""
    loop = asyncio.get_running_loop()
    timer = threading.Timer(seconds, loop.call_soon_threadsafe, (task.cancel,))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def assert_answer(result: Any, ident: int, rows: int = 1, cols: int = 2) -> None:
    assert isinstance(result, InferResult), result
    x = np.full((rows, cols), ident, np.float32)
    np.testing.assert_array_equal(result.outputs["y"], x * 2)
    np.testing.assert_array_equal(result.outputs["z"], x + 1)


# -- when a batch closes ---------------------------------------------------------------------


async def test_full_batch_dispatches_at_once_without_waiting_for_the_delay() -> None:
    executor = FakeExecutor(cost=0.5)
    batcher = make_batcher(executor, max_batch_size=4, max_queue_delay=10.0)
    results = await answers([submit_at(batcher, 0.0, request(i)) for i in range(4)])
    for i, result in enumerate(results):
        assert_answer(result, i)
        assert result.batch_rows == 4
        assert result.queue_time == 0.0
        assert result.compute_time == 0.5
    assert [(b.started, b.ids) for b in executor.batches] == [(0.0, [0, 1, 2, 3])]


async def test_batch_fills_by_later_arrivals_dispatches_when_full() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=3, max_queue_delay=10.0)
    tasks = [submit_at(batcher, at, request(i)) for i, at in enumerate([0.0, 1.0, 2.5])]
    await answers(tasks)
    assert [(b.started, b.ids) for b in executor.batches] == [(2.5, [0, 1, 2])]


async def test_lone_requests_are_not_held_for_a_batch_that_is_not_coming() -> None:
    executor = FakeExecutor(cost=0.01)
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=1.0, adaptive_delay=True)
    arrivals = [0.0, 5.0, 10.0, 15.0]
    results = await answers([submit_at(batcher, at, request(i)) for i, at in enumerate(arrivals)])
    # No estimate before a gap is known: the first waits out the delay; from the second on,
    # requests 5 s apart are not expected within 1 s, so each leaves at once.
    assert [r.queue_time for r in results] == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert [(b.started, b.ids) for b in executor.batches] == [
        (1.0, [0]),
        (5.0, [1]),
        (10.0, [2]),
        (15.0, [3]),
    ]


async def test_requests_expected_within_the_delay_still_fill_the_batch() -> None:
    executor = FakeExecutor(cost=0.01)
    batcher = make_batcher(executor, max_batch_size=4, max_queue_delay=1.0, adaptive_delay=True)
    arrivals = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    await answers([submit_at(batcher, at, request(i)) for i, at in enumerate(arrivals)])
    # Arrivals 0.1 s apart are expected within the delay: the first batch fills to 4.
    assert executor.batches[0].ids == [0, 1, 2, 3]


async def test_a_lone_request_on_an_idle_slot_runs_inline_at_once() -> None:
    executor = FakeExecutor(inline_rows=1)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=8, max_queue_delay=0.0)
    result = await batcher.submit(request(7))
    assert_answer(result, 7)
    assert result.queue_time == 0.0
    assert [(b.inline, b.ids) for b in executor.batches] == [(True, [7])]
    assert batcher.queued == 0 and batcher.in_flight == 0
    (report,) = observer.reports
    assert report.rows == 1 and report.error is None and report.in_flight == 0


async def test_an_inline_run_never_overtakes_queued_requests() -> None:
    # A 2-row request is too long to run inline: it executes for 1 s on the slot. A 1-row
    # request arriving meanwhile finds the slot busy and queues behind it, not inline.
    executor = FakeExecutor(cost=1.0, inline_rows=1)
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=0.0)
    long = submit_at(batcher, 0.0, request(0, rows=2))
    short = submit_at(batcher, 0.1, request(1))
    await answers([long, short])
    assert [(b.started, b.inline, b.ids) for b in executor.batches] == [
        (0.0, False, [0]),
        (1.0, False, [1]),
    ]


async def test_a_failed_inline_run_answers_its_request_inference_failed() -> None:
    executor = FakeExecutor(inline_rows=1, fail=RuntimeError("index out of range"))
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=8, max_queue_delay=0.0)
    with pytest.raises(InferenceFailed, match="index out of range"):
        await batcher.submit(request(3))
    (report,) = observer.reports
    assert isinstance(report.error, RuntimeError)
    # The batcher stays usable.
    executor.fail = None
    assert_answer(await batcher.submit(request(4)), 4)


async def test_delay_counts_from_the_oldest_request_arrival() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=1.0)
    a = submit_at(batcher, 0.0, request(0))
    b = submit_at(batcher, 0.6, request(1))
    ra, rb = await answers([a, b])
    # Not 1.6 (the latest arrival plus the delay) and not later than the oldest's delay.
    assert [(b.started, b.ids) for b in executor.batches] == [(1.0, [0, 1])]
    assert ra.queue_time == pytest.approx(1.0)
    assert rb.queue_time == pytest.approx(0.4)


async def test_lone_request_waits_exactly_the_delay() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=0.25)
    (result,) = await answers([submit_at(batcher, 3.0, request(7))])
    assert_answer(result, 7)
    assert [b.started for b in executor.batches] == [3.25]


async def test_delay_ending_between_clock_ticks_dispatches_instead_of_spinning() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=0.2)
    task = submit_at(batcher, 0.1, request(0))
    with cancel_if_the_loop_spins(task):
        (result,) = await answers([task])
    assert_answer(result, 0)
    assert [b.started for b in executor.batches] == [pytest.approx(0.3)]


async def test_preferred_batch_size_dispatches_before_the_delay() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(
        executor, max_batch_size=8, max_queue_delay=10.0, preferred_batch_sizes=(2,)
    )
    tasks = [submit_at(batcher, 0.0, request(0)), submit_at(batcher, 0.0, request(1))]
    await answers(tasks)
    assert [(b.started, b.ids) for b in executor.batches] == [(0.0, [0, 1])]


async def test_largest_reachable_preferred_size_is_chosen() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(
        executor, max_batch_size=8, max_queue_delay=10.0, preferred_batch_sizes=(2, 4)
    )
    # Five rows queued at once: 4 is the largest preferred size reachable, 2 is not chosen.
    tasks = [submit_at(batcher, 0.0, request(i)) for i in range(5)]
    await answers(tasks)
    assert [(b.started, b.ids) for b in executor.batches] == [
        (0.0, [0, 1, 2, 3]),
        # The leftover row reaches no preferred size: it waits for the delay.
        (10.0, [4]),
    ]


async def test_preferred_size_counts_rows_not_requests() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(
        executor, max_batch_size=8, max_queue_delay=10.0, preferred_batch_sizes=(4,)
    )
    tasks = [submit_at(batcher, 0.0, request(0, rows=3)), submit_at(batcher, 1.0, request(1))]
    await answers(tasks)
    assert [(b.started, b.ids, b.rows) for b in executor.batches] == [(1.0, [0, 1], 4)]


async def test_zero_delay_forms_batches_while_the_slot_is_busy() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=0.0)
    tasks = [submit_at(batcher, 0.0, request(0))]
    tasks += [submit_at(batcher, 0.1 * i, request(i)) for i in range(1, 4)]
    results = await answers(tasks)
    # An idle slot adds no latency; requests arriving while it executes ride together next.
    assert [(b.started, b.ids) for b in executor.batches] == [(0.0, [0]), (1.0, [1, 2, 3])]
    assert [r.batch_rows for r in results] == [1, 3, 3, 3]


# -- the queue -------------------------------------------------------------------------------


async def test_full_queue_rejects_at_once_and_executing_requests_do_not_count() -> None:
    executor = FakeExecutor(cost=1.0)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=4, max_queue_size=2)
    running = submit_at(batcher, 0.0, request(0))
    waiting = [submit_at(batcher, 0.1, request(1)), submit_at(batcher, 0.1, request(2))]
    await asyncio.sleep(0.2)
    assert batcher.in_flight == 1
    assert batcher.queued == 2
    with pytest.raises(QueueFull, match="max_queue_size=2"):
        await batcher.submit(request(3))
    assert now() == 0.2, "QueueFull must be answered without waiting"
    assert observer.rejections == [RejectReason.QUEUE_FULL]
    results = await answers([running, *waiting])
    for i, result in enumerate(results):
        assert_answer(result, i)
    assert batcher.queued == 0
    # Drained: accepted again.
    assert_answer(await settle(batcher.submit(request(4))), 4)
    assert [b.ids for b in executor.batches] == [[0], [1, 2], [4]]


async def test_request_expiring_in_the_queue_is_answered_and_never_executed() -> None:
    executor = FakeExecutor(cost=5.0)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=4)
    long_batch = submit_at(batcher, 0.0, request(0))
    expiring = submit_at(batcher, 1.0, request(1, deadline=2.0))
    patient = submit_at(batcher, 1.0, request(2, deadline=100.0))
    results = await answers([long_batch, expiring, patient])
    assert isinstance(results[1], DeadlineExceeded)
    assert_answer(results[2], 2)
    assert [b.ids for b in executor.batches] == [[0], [2]]
    assert observer.rejections == [RejectReason.DEADLINE]
    assert batcher.queued == 0


async def test_request_expiring_as_its_batch_is_dispatched_is_never_executed() -> None:
    # The deadline and the queue delay end at the same loop time: whichever fires first, the
    # request is answered DeadlineExceeded and the executor never sees it.
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=4, max_queue_delay=1.0)
    tasks = [submit_at(batcher, 0.0, request(0, deadline=1.0)), submit_at(batcher, 0.0, request(1))]
    expired, served = await answers(tasks)
    assert isinstance(expired, DeadlineExceeded)
    assert_answer(served, 1)
    assert [b.ids for b in executor.batches] == [[1]]


async def test_request_past_its_deadline_at_submit_is_rejected_at_once() -> None:
    executor = FakeExecutor()
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=4)
    await asyncio.sleep(5.0)
    with pytest.raises(DeadlineExceeded, match="before the request was queued"):
        await batcher.submit(request(0, deadline=5.0))
    assert now() == 5.0
    assert observer.rejections == [RejectReason.DEADLINE]
    assert batcher.queued == 0
    await asyncio.sleep(1.0)
    assert executor.batches == []


async def test_request_the_queued_work_would_keep_past_its_deadline_is_shed_at_once() -> None:
    executor = FakeExecutor(cost=1.0)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=1)
    assert_answer(await settle(batcher.submit(request(0))), 0)  # measures a batch: 1 s
    backlog = [submit_at(batcher, 1.5, request(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0.625)
    assert (batcher.in_flight, batcher.queued) == (1, 2)
    # One batch running, two queued, then its own: ~4 s, past a deadline 2.5 s away.
    with pytest.raises(QueueFull, match="overloaded"):
        await batcher.submit(request(4, deadline=now() + 2.5))
    assert now() == 1.625, "shed requests are answered at once"
    assert observer.rejections == [RejectReason.SHED]
    patient = submit_at(batcher, 1.625, request(5, deadline=now() + 10.0))
    results = await answers([*backlog, patient])
    for result, ident in zip(results, (1, 2, 3, 5), strict=True):
        assert_answer(result, ident)
    assert 4 not in [i for b in executor.batches for i in b.ids]


async def test_an_idle_model_never_sheds_and_a_fixed_cost_is_not_scaled_by_rows() -> None:
    # 10 ms a batch + 0.1 ms a row; measured at one row only.
    executor = FakeExecutor(cost=lambda batch: 0.010 + 0.0001 * sum(len(p["x"]) for p in batch))
    batcher = make_batcher(executor, max_batch_size=32)
    assert_answer(await settle(batcher.submit(request(0))), 0)
    # Idle: a 16-row request with 100 ms to go is served (it takes ~12 ms).
    assert_answer(await settle(batcher.submit(request(1, rows=16, deadline=now() + 0.1))), 1, 16)
    # One batch running, nothing queued: a 1-row request with 100 ms to go waits ~20 ms.
    running = submit_at(batcher, now(), request(2, rows=32))
    await asyncio.sleep(0.001)
    assert batcher.in_flight == 1
    assert_answer(await settle(batcher.submit(request(3, deadline=now() + 0.1))), 3)
    assert_answer((await answers([running]))[0], 2, 32)


async def test_only_requests_as_urgent_or_more_are_ahead_of_a_request() -> None:
    executor = FakeExecutor(cost=1.0)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=1)
    assert_answer(await settle(batcher.submit(request(0))), 0)  # measures 1 s
    busy = submit_at(batcher, now(), request(1))
    background = [submit_at(batcher, now(), request(i, priority=5)) for i in range(2, 12)]
    await asyncio.sleep(TICK)
    assert (batcher.in_flight, batcher.queued) == (1, 10)
    # Ten low-priority requests wait, but an urgent one runs next: ~2 s, within 3.
    urgent = await settle(batcher.submit(request(12, priority=1, deadline=now() + 3.0)))
    assert_answer(urgent, 12)
    assert RejectReason.SHED not in observer.rejections
    await answers([busy, *background])


async def test_nothing_is_shed_before_a_batch_time_was_measured() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=1)
    tasks = [submit_at(batcher, 0.0, request(i, deadline=1.5)) for i in range(2)]
    first, second = await answers(tasks)
    assert_answer(first, 0)
    assert isinstance(second, DeadlineExceeded)


async def test_request_whose_batch_would_end_after_its_deadline_is_never_executed() -> None:
    costs = iter([0.5, 2.0, 0.5])
    executor = FakeExecutor(cost=lambda batch: next(costs))
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=1)
    assert_answer(await settle(batcher.submit(request(0))), 0)  # measures 0.5 s
    slow = submit_at(batcher, 1.0, request(1))  # runs 1.0 .. 3.0
    # Admitted at 1.1 (~1 s of work ahead), but at 3.0 its batch would end past 3.5.
    late = submit_at(batcher, 1.1, request(2, deadline=3.5))
    results = await answers([slow, late])
    assert_answer(results[0], 1)
    assert isinstance(results[1], DeadlineExceeded)
    assert "would pass before its batch finished" in results[1].message
    assert [b.ids for b in executor.batches] == [[0], [1]]
    assert observer.rejections == [RejectReason.DEADLINE]


async def test_cancelled_request_leaves_the_queue_and_is_never_executed() -> None:
    executor = FakeExecutor(cost=1.0)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=4)
    running = submit_at(batcher, 0.0, request(0))
    doomed = submit_at(batcher, 0.1, request(1))
    kept = submit_at(batcher, 0.1, request(2))
    await asyncio.sleep(0.5)
    assert batcher.queued == 2
    doomed.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert batcher.queued == 1
    results = await answers([running, doomed, kept])
    assert isinstance(results[1], asyncio.CancelledError)
    assert_answer(results[2], 2)
    assert [b.ids for b in executor.batches] == [[0], [2]]
    assert observer.rejections == [RejectReason.CANCELLED]


async def test_caller_cancelled_while_its_batch_executes_gets_no_answer_and_others_do() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=4)
    tasks = [submit_at(batcher, 0.0, request(i)) for i in range(3)]
    await asyncio.sleep(0.5)
    tasks[1].cancel()
    results = await answers(tasks)
    assert isinstance(results[1], asyncio.CancelledError)
    assert_answer(results[0], 0)
    assert_answer(results[2], 2)


# -- who runs it -----------------------------------------------------------------------------


@pytest.mark.parametrize(("instances", "starts"), [(1, [0, 1, 2, 3]), (2, [0, 0, 1, 1])])
async def test_instances_bound_how_many_batches_execute_at_once(
    instances: int, starts: list[float]
) -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=1, instances=instances)
    await answers([submit_at(batcher, 0.0, request(i)) for i in range(4)])
    assert [b.started for b in executor.batches] == starts
    assert executor.most_running == instances
    spans = [(b.started, b.finished) for b in executor.batches]
    overlapping = [
        (a, b)
        for a, b in itertools.combinations(spans, 2)
        if a[1] is not None and b[1] is not None and a[0] < b[1] and b[0] < a[1]
    ]
    assert bool(overlapping) == (instances > 1)


# -- what may share a batch ------------------------------------------------------------------


async def test_requests_with_different_shapes_never_share_a_batch() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=8, max_queue_delay=1.0)
    tasks = [submit_at(batcher, 0.0, request(i, cols=2 + i % 2)) for i in range(6)]
    results = await answers(tasks)
    for i, result in enumerate(results):
        assert_answer(result, i, cols=2 + i % 2)
    assert sorted(b.ids for b in executor.batches) == [[0, 2, 4], [1, 3, 5]]
    for batch in executor.batches:
        assert len({part["x"].shape[1:] for part in batch.inputs}) == 1


async def test_requests_with_different_dtypes_never_share_a_batch() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=8)
    f32 = request(0)
    f64 = InferRequest(model="m", inputs={"x": np.full((1, 2), 1, np.float64)})
    await answers([submit_at(batcher, 0.0, f32), submit_at(batcher, 0.0, f64)])
    assert sorted(b.ids for b in executor.batches) == [[0], [1]]


async def test_more_urgent_priority_runs_first() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=1, default_priority=3)
    tasks = [
        submit_at(batcher, 0.0, request(0, priority=5)),
        submit_at(batcher, 0.1, request(1, priority=5)),
        submit_at(batcher, 0.2, request(2, priority=5)),
        # Priority 0 names none: it takes default_priority 3, ahead of 5, behind 1.
        submit_at(batcher, 0.3, request(3, priority=0)),
        submit_at(batcher, 0.4, request(4, priority=1)),
    ]
    await answers(tasks)
    assert [b.ids for b in executor.batches] == [[0], [4], [3], [1], [2]]


async def test_priority_orders_requests_within_a_batch() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=2)
    tasks = [submit_at(batcher, 0.0, request(0))]
    tasks += [submit_at(batcher, 0.1 * i, request(i, priority=5 - i)) for i in range(1, 4)]
    await answers(tasks)
    assert [b.ids for b in executor.batches] == [[0], [3, 2], [1]]


async def test_batch_never_exceeds_max_batch_size_rows() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=4, max_queue_delay=1.0)
    tasks = [submit_at(batcher, 0.0, request(0, rows=3)), submit_at(batcher, 0.0, request(1, 2))]
    results = await answers(tasks)
    assert_answer(results[0], 0, rows=3)
    assert_answer(results[1], 1, rows=2)
    assert [(b.ids, b.rows) for b in executor.batches] == [([0], 3), ([1], 2)]


async def test_request_with_more_rows_than_max_batch_size_is_invalid() -> None:
    executor = FakeExecutor()
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=4)
    with pytest.raises(InvalidInput, match="batch dimension 5 exceeds max_batch_size 4"):
        await batcher.submit(request(0, rows=5))
    assert observer.rejections == [RejectReason.INVALID]
    assert batcher.queued == 0
    assert_answer(await settle(batcher.submit(request(1, rows=4))), 1, rows=4)


async def test_model_without_batch_dim_executes_each_request_alone() -> None:
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, max_batch_size=0, max_queue_delay=5.0)
    # Without a batch dim, dim 0 is data: shapes (3, 2) are one request's whole input.
    results = await answers([submit_at(batcher, 0.0, request(i, rows=3)) for i in range(3)])
    for i, result in enumerate(results):
        assert_answer(result, i, rows=3)
        assert result.batch_rows == 1
    # Each runs as soon as the slot frees; the delay is irrelevant when nothing can batch.
    assert [(b.started, b.ids) for b in executor.batches] == [(0.0, [0]), (1.0, [1]), (2.0, [2])]


# -- answers ---------------------------------------------------------------------------------


async def test_failing_batch_fails_every_request_that_fails_alone_and_the_next_batch_works() -> (
    None
):
    executor = FakeExecutor(fail=RuntimeError("device lost"))
    batcher = make_batcher(executor, max_batch_size=4)
    failed = await answers([submit_at(batcher, 0.0, request(i)) for i in range(3)])
    assert [type(r) for r in failed] == [InferenceFailed] * 3
    assert "device lost" in str(failed[0])
    # The batch of 3 failed, then each request failed again when run alone.
    assert "batch of 1 rows" in str(failed[0])
    executor.fail = None
    results = await answers([submit_at(batcher, 1.0, request(i)) for i in range(3, 5)])
    assert_answer(results[0], 3)
    assert_answer(results[1], 4)


async def test_executor_returning_the_wrong_number_of_results_fails_the_whole_batch() -> None:
    executor = FakeExecutor(drop_one=True)
    batcher = make_batcher(executor, max_batch_size=4)
    results = await answers([submit_at(batcher, 0.0, request(i)) for i in range(3)])
    assert [type(r) for r in results] == [InferenceFailed] * 3
    assert "returned 0 results for 1" in str(results[0])


async def test_one_bad_request_fails_alone_not_the_requests_batched_with_it() -> None:
    def fail_if_poisoned(batch: Sequence[Mapping[str, Array]]) -> BaseException | None:
        poisoned = any(float(part["x"].flat[0]) == 1 for part in batch)
        return RuntimeError("index out of range") if poisoned else None

    executor = FakeExecutor(fail=fail_if_poisoned)
    batcher = make_batcher(executor, max_batch_size=4)
    results = await answers([submit_at(batcher, 0.0, request(i)) for i in range(3)])
    assert_answer(results[0], 0)
    assert isinstance(results[1], InferenceFailed) and "index out of range" in str(results[1])
    assert_answer(results[2], 2)


async def test_each_request_gets_only_the_outputs_it_asked_for() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=4, max_queue_delay=1.0)
    tasks = [
        submit_at(batcher, 0.0, request(0, outputs=("y",))),
        submit_at(batcher, 0.0, request(1, outputs=("z",))),
        submit_at(batcher, 0.0, request(2, outputs=("y",))),
    ]
    only_y, only_z, again_y = await answers(tasks)
    # The executor computes the union, once.
    assert [(b.ids, b.outputs) for b in executor.batches] == [([0, 1, 2], ("y", "z"))]
    assert set(only_y.outputs) == {"y"}
    assert set(only_z.outputs) == {"z"}
    assert set(again_y.outputs) == {"y"}
    np.testing.assert_array_equal(only_z.outputs["z"], np.full((1, 2), 2, np.float32))


async def test_a_request_asking_for_every_output_makes_the_batch_compute_all() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=4, max_queue_delay=1.0)
    tasks = [
        submit_at(batcher, 0.0, request(0, outputs=("y",))),
        submit_at(batcher, 0.0, request(1)),
    ]
    only_y, every = await answers(tasks)
    assert [b.outputs for b in executor.batches] == [()]
    assert set(only_y.outputs) == {"y"}
    assert_answer(every, 1)


async def test_drain_executes_everything_queued_without_waiting_then_refuses() -> None:
    executor = FakeExecutor(cost=1.0)
    observer = RecordingObserver()
    batcher = make_batcher(executor, observer, max_batch_size=2, max_queue_delay=10.0)
    tasks = [submit_at(batcher, 0.0, request(i)) for i in range(3)]
    tasks.append(submit_at(batcher, 0.0, request(3, cols=3)))
    await asyncio.sleep(0.5)
    # The first two filled a batch; the rest wait for the 10 s delay.
    assert batcher.queued == 2
    await settle(batcher.drain())
    assert now() == 3.0, "drain returns once the last batch has run, without the delay"
    assert all(t.done() for t in tasks)
    results = [t.result() for t in tasks]
    for i, result in enumerate(results[:3]):
        assert_answer(result, i)
    assert_answer(results[3], 3, cols=3)
    # Shape queues of equal age are served in the order they were created.
    assert [(b.started, b.ids) for b in executor.batches] == [
        (0.0, [0, 1]),
        (1.0, [2]),
        (2.0, [3]),
    ]
    assert batcher.queued == 0
    assert batcher.in_flight == 0
    with pytest.raises(Unavailable, match="unloading"):
        await batcher.submit(request(9))
    assert observer.rejections == [RejectReason.UNAVAILABLE]


async def test_close_refuses_new_requests() -> None:
    executor = FakeExecutor()
    batcher = make_batcher(executor, max_batch_size=2)
    assert_answer(await settle(batcher.submit(request(0))), 0)
    await settle(batcher.close())
    with pytest.raises(Unavailable):
        await batcher.submit(request(1))


async def test_drain_of_a_batcher_that_never_ran_returns() -> None:
    batcher = make_batcher(FakeExecutor(), max_batch_size=2)
    await settle(batcher.drain())
    with pytest.raises(Unavailable):
        await batcher.submit(request(0))


# -- statistics ------------------------------------------------------------------------------


async def test_statistics_match_the_batches_executed() -> None:
    stats = VersionStatistics()
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, StatisticsRecorder(stats), max_batch_size=4, max_queue_size=3)
    tasks = [submit_at(batcher, 0.0, request(0, rows=2))]
    tasks += [submit_at(batcher, 0.5, request(i, rows=i)) for i in (1, 2, 3)]
    # At 0.5 three wait behind the running batch: the queue (3) is full.
    tasks.append(submit_at(batcher, 0.6, request(4)))
    tasks.append(submit_at(batcher, 0.6, request(5, rows=5)))
    tasks.append(submit_at(batcher, 0.6, request(6, deadline=0.1)))
    results = await answers(tasks)
    assert [type(r).__name__ for r in results[4:]] == [
        "QueueFull",
        "InvalidInput",
        "DeadlineExceeded",
    ]
    # Then a failing batch of two requests.
    executor.fail = RuntimeError("boom")
    failed = await answers([submit_at(batcher, 10.0, request(i)) for i in (7, 8)])
    assert [type(r) for r in failed] == [InferenceFailed] * 2

    good = [b for b in executor.batches if b.ids[0] not in (7, 8)]
    assert [b.ids for b in good] == [[0], [1, 2], [3]]
    assert stats.success.count == sum(len(b.ids) for b in good) == 4
    assert stats.inference_count == sum(b.rows for b in good) == 8
    assert stats.execution_count == len(good) == 3
    assert stats.batch_sizes == Counter(b.rows for b in good) == {2: 1, 3: 2}
    assert stats.failure.count == 3 + 2
    # Per successful request, its batch's runtime: 1 s each.
    assert (stats.compute_infer.count, stats.compute_infer.ns) == (4, 4 * 1_000_000_000)
    # Queue waits: 0 for the first, 0.5 for 1 and 2 (dispatched at 1.0), 1.5 for 3 (at 2.0).
    assert stats.queue.count == 4
    assert stats.queue.ns == pytest.approx(2.5e9, abs=10)


async def test_request_whose_deadline_passes_while_executing_is_not_counted_a_success() -> None:
    stats = VersionStatistics()
    executor = FakeExecutor(cost=1.0)
    batcher = make_batcher(executor, StatisticsRecorder(stats), max_batch_size=4)
    late, served = await answers(
        [submit_at(batcher, 0.0, request(0, deadline=0.5)), submit_at(batcher, 0.0, request(1))]
    )
    assert isinstance(late, DeadlineExceeded)
    assert "while the request's batch executed" in str(late)
    assert_answer(served, 1)
    assert [b.ids for b in executor.batches] == [[0, 1]]
    # The caller of request 0 was answered DEADLINE_EXCEEDED: it is no success.
    assert (stats.success.count, stats.failure.count) == (1, 1)


# -- randomized ------------------------------------------------------------------------------


@dataclass
class Caller:
    ident: int
    at: float
    rows: int
    cols: int
    priority: int
    deadline: float | None
    cancel_at: float | None
    outputs: tuple[str, ...]
    cancelled: bool = False
    task: asyncio.Task[InferResult] | None = None


async def test_every_request_gets_exactly_one_answer_under_random_load() -> None:
    rng = random.Random(20240611)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    stats = VersionStatistics()
    policy = BatchingPolicy(
        max_batch_size=8,
        max_queue_delay=TICK,
        preferred_batch_sizes=(4,),
        max_queue_size=48,
        instances=2,
        default_priority=2,
    )
    callers: dict[int, Caller] = {}
    violations: list[str] = []

    def check(batch: Sequence[Mapping[str, Array]]) -> None:
        t = loop.time()
        if sum(part["x"].shape[0] for part in batch) > policy.max_batch_size:
            violations.append(f"batch of more than {policy.max_batch_size} rows at {t}")
        for part in batch:
            caller = callers[int(part["x"].flat[0])]
            if caller.deadline is not None and caller.deadline <= t:
                violations.append(f"request {caller.ident} executed after its deadline at {t}")
            if caller.cancelled:
                violations.append(f"request {caller.ident} executed after it was cancelled")

    def fail(batch: Sequence[Mapping[str, Array]]) -> BaseException | None:
        return RuntimeError("random failure") if rng.random() < 0.1 else None

    executor = FakeExecutor(
        cost=lambda batch: rng.uniform(0.005, 0.04) * (1 + sum(len(p["x"]) for p in batch) / 8),
        fail=fail,
        check=check,
    )
    depths = RecordingObserver()
    batcher = Batcher(
        "m",
        1,
        policy,
        executor,
        MultiObserver([StatisticsRecorder(stats), depths]),
        fine_timer=False,
    )

    for ident in range(500):
        # Steady arrivals over four seconds, and a burst that overflows the queue. Arrivals and
        # the delay sit on a 1/64 s grid, exact both as floats and as looptime's whole
        # microseconds (see test_delay_ending_between_clock_ticks_dispatches_instead_of_spinning).
        slot = rng.randrange(4 * 64) if rng.random() < 0.85 else 2 * 64
        at = slot * TICK
        roll = rng.random()
        deadline = (
            None
            if roll < 0.5
            else at - 0.001
            if roll < 0.55
            else round(at + rng.uniform(0.001, 0.15), 6)
        )
        callers[ident] = Caller(
            ident=ident,
            at=at,
            rows=rng.choice([1, 1, 1, 2, 3, 4, 9]),
            cols=rng.choice([2, 2, 3]),
            priority=rng.choice([0, 1, 2, 3]),
            deadline=deadline,
            cancel_at=round(at + rng.uniform(0.0, 0.1), 6) if rng.random() < 0.1 else None,
            outputs=rng.choice([(), ("y",), ("z",), ("y", "z")]),
        )

    async def cancel_later(caller: Caller) -> None:
        assert caller.cancel_at is not None and caller.task is not None
        await asyncio.sleep(caller.cancel_at - loop.time())
        if not caller.task.done():
            caller.cancelled = True
            caller.task.cancel()

    cancellers = []
    for caller in callers.values():
        caller.task = submit_at(
            batcher,
            caller.at,
            request(
                caller.ident,
                caller.rows,
                caller.cols,
                deadline=caller.deadline,
                priority=caller.priority,
                outputs=caller.outputs,
            ),
        )
        if caller.cancel_at is not None:
            cancellers.append(loop.create_task(cancel_later(caller)))

    outcomes = await answers([c.task for c in callers.values() if c.task is not None])
    await settle(asyncio.gather(*cancellers))
    await settle(batcher.drain())

    kinds: Counter[str] = Counter()
    for caller, outcome in zip(callers.values(), outcomes, strict=True):
        kinds[type(outcome).__name__] += 1
        if isinstance(outcome, InferResult):
            x = np.full((caller.rows, caller.cols), caller.ident, np.float32)
            wanted = set(caller.outputs) or {"y", "z"}
            assert set(outcome.outputs) == wanted, caller
            if "y" in wanted:
                np.testing.assert_array_equal(outcome.outputs["y"], x * 2)
            if "z" in wanted:
                np.testing.assert_array_equal(outcome.outputs["z"], x + 1)
            assert outcome.batch_rows <= policy.max_batch_size
        elif isinstance(outcome, asyncio.CancelledError):
            assert caller.cancelled, f"request {caller.ident} cancelled by no one"
        else:
            assert isinstance(outcome, InferdError), outcome
            if isinstance(outcome, InvalidInput):
                assert caller.rows > policy.max_batch_size
            if caller.rows > policy.max_batch_size:
                assert isinstance(outcome, InvalidInput)
            if isinstance(outcome, DeadlineExceeded):
                assert caller.deadline is not None

    assert violations == []
    assert loop_errors == []
    assert batcher.queued == 0
    assert batcher.in_flight == 0
    assert min(depths.depths) >= 0
    assert max(depths.depths) <= policy.max_queue_size
    assert depths.depths[-1] == 0
    # Each request is counted exactly once, as a success or a failure.
    assert stats.success.count + stats.failure.count == len(callers)
    succeeded = [b for b in executor.batches if not b.failed]
    assert stats.execution_count == len(succeeded)
    assert stats.inference_count == sum(b.rows for b in succeeded)
    assert stats.batch_sizes == Counter(b.rows for b in succeeded)
    # The mix exercised every path.
    for kind in ("InferResult", "InferenceFailed", "DeadlineExceeded", "QueueFull"):
        assert kinds[kind] > 0, kinds
    assert kinds["InvalidInput"] > 0 and kinds["CancelledError"] > 0, kinds
    assert max(b.rows for b in executor.batches) > 1


def test_statistics_split_a_batch_into_runtime_stages_and_the_hand_off() -> None:
    stats = VersionStatistics()
    StatisticsRecorder(stats, clock_ns=lambda: 0).batch_finished(
        BatchReport(
            model="m",
            version=1,
            rows=2,
            queue_times=(0.002, 0.001),
            trace_contexts=(None, None),
            compute_time=0.010,
            input_time=0.001,
            infer_time=0.005,
            output_time=0.001,
            error=None,
            in_flight=0,
        )
    )
    # Each of the two requests waited for its whole batch: 3 ms of it outside the runtime.
    assert stats.handoff.count == 2
    assert stats.handoff.ns == pytest.approx(2 * 3_000_000, abs=2)
    assert stats.compute_infer.ns == pytest.approx(2 * 5_000_000, abs=2)
    assert stats.queue.ns == pytest.approx(3_000_000, abs=2)
