"""The dynamic batcher: one per model version.

Three parts, as in TF Serving's batch scheduler:
- the queue (what waits, `batching/queue.py`): one `ShapeQueue` per shape signature, since only
  requests whose non-batch dims and dtypes agree can be concatenated; inside it, FIFO per
  priority level;
- the policy (when a batch closes and what it takes, `batching/policy.py`);
- the mechanics (who runs it, here): `instances` execution slots, the dispatcher task and its
  timer, each request's future, and the hand-off to the executor, which runs each batch off
  the event loop.

Plain asyncio: no gRPC types. Tests drive it with a fake executor on a fake loop clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from inferd.core.batching.policy import ArrivalEstimate, BatchingPolicy, next_queue
from inferd.core.batching.queue import EntryState, QueuedRequest, ShapeQueue
from inferd.core.batching.shedding import DrainRate, ServiceTimeEstimate, expected_finish
from inferd.core.batching.timer import wait_until
from inferd.core.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    QueueFull,
    Unavailable,
)
from inferd.core.observer import BatchReport, Observer, RejectReason
from inferd.core.types import Array, InferRequest, InferResult

# A caller's transport cancels it at its deadline, measured on another clock: a cancellation
# this close to the deadline is the deadline, not the caller going away.
DEADLINE_SLACK = 0.005


@dataclass(frozen=True, slots=True)
class BatchRun:
    """What an executor returns: each request's outputs, in batch order, and where the time
    went (seconds): preparing inputs, running the model, splitting outputs."""

    outputs: list[dict[str, Array]]
    input_time: float = 0.0
    infer_time: float = 0.0
    output_time: float = 0.0


class BatchExecutor(Protocol):
    """Runs one batch: each element of `batch` is one request's inputs. `outputs` lists the
    names to compute (empty: all)."""

    async def execute(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun: ...

    def run_inline(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun | None:
        """Run the batch now, on the caller's thread, if it is short enough not to hold up the
        event loop (faster than handing it to a thread); None, having done nothing, if not."""
        ...


class Batcher:
    """Queues requests for one model version and executes them in batches.

    `submit` answers every request it accepts exactly once: with its outputs, or with the error
    that stopped it (QueueFull at once, DeadlineExceeded, Cancelled, InferenceFailed,
    Unavailable after `close`).
    """

    def __init__(
        self,
        model: str,
        version: int,
        policy: BatchingPolicy,
        executor: BatchExecutor,
        observer: Observer | None = None,
        fine_timer: bool = True,
    ) -> None:
        """`fine_timer` False keeps every wait on the loop's own clock (fake-clock tests)."""
        self.model = model
        self._fine_timer = fine_timer
        self.version = version
        self.policy = policy
        self._executor = executor
        self._observer = observer or Observer()
        self._queues: dict[tuple[Any, ...], ShapeQueue] = {}
        self._queued = 0
        # Rows waiting, by priority level: what a new request of each level waits behind.
        self._rows_by_priority: dict[int, int] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        # Batches executing. Not len(_in_flight): a task leaves that set in a done-callback,
        # after the callers it answered have already run and sent their next requests, which
        # would then find the slot still taken and skip the inline path.
        self._running = 0
        self._running_rows = 0
        self._slots = asyncio.Semaphore(policy.instances)
        self._wake = asyncio.Event()
        self._draining = False
        self._closed = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._arrivals = ArrivalEstimate(policy.max_queue_delay)
        self._service = ServiceTimeEstimate()
        self._drain = DrainRate()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._running

    @property
    def closed(self) -> bool:
        """Whether `close` has returned: everything accepted was answered, nothing more is."""
        return self._closed

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(
                self._dispatch_forever(), name=f"batcher:{self.model}:{self.version}"
            )

    async def submit(self, request: InferRequest) -> InferResult:
        if self._draining:
            self._reject(RejectReason.UNAVAILABLE)
            raise Unavailable(f"model '{self.model}' version {self.version} is unloading")
        loop = asyncio.get_running_loop()
        now = loop.time()
        entry = QueuedRequest(
            request,
            loop.create_future(),
            now,
            request.priority or self.policy.default_priority,
            self.policy.max_batch_size > 0,
        )
        if entry.rows > self.policy.batch_limit:
            self._reject(RejectReason.INVALID)
            raise InvalidInput(
                f"batch dimension {entry.rows} exceeds max_batch_size "
                f"{self.policy.max_batch_size} of model '{self.model}'"
            )
        if request.deadline is not None and request.deadline <= now:
            self._reject(RejectReason.DEADLINE)
            raise DeadlineExceeded("deadline passed before the request was queued")
        if self._queued >= self.policy.max_queue_size:
            self._reject(RejectReason.QUEUE_FULL)
            raise QueueFull(
                f"queue of model '{self.model}' version {self.version} is full "
                f"(max_queue_size={self.policy.max_queue_size})"
            )
        if request.deadline is not None:
            self._shed_if_too_late(entry, request.deadline, now)
        self.start()
        self._arrivals.arrived(now)
        if self._may_run_now(entry, now):
            inline = self._run_inline(entry)
            if inline is not None:
                return inline
        queue = self._queues.get(entry.key)
        if queue is None:
            queue = self._queues[entry.key] = ShapeQueue()
        queue.push(entry)
        self._queued += 1
        levels = self._rows_by_priority
        levels[entry.priority] = levels.get(entry.priority, 0) + entry.rows
        self._observer.queue_depth_changed(self.model, self.version, self._queued)
        self._wake.set()
        try:
            if request.deadline is None:
                return await entry.future
            async with asyncio.timeout_at(request.deadline):
                return await entry.future
        except TimeoutError:
            if self._unqueue(entry):
                self._reject(RejectReason.DEADLINE)
                raise DeadlineExceeded(
                    f"deadline passed after {loop.time() - entry.arrival:.6f} s in the queue"
                ) from None
            raise DeadlineExceeded("deadline passed while the request's batch executed") from None
        except asyncio.CancelledError:
            if self._unqueue(entry):
                # gRPC cancels the caller at its deadline: count that as the deadline it is.
                late = (
                    request.deadline is not None
                    and loop.time() >= request.deadline - DEADLINE_SLACK
                )
                self._reject(RejectReason.DEADLINE if late else RejectReason.CANCELLED)
            raise

    def _shed_if_too_late(self, entry: QueuedRequest, deadline: float, now: float) -> None:
        """Refuse at once (RESOURCE_EXHAUSTED) a request that the work queued ahead of it would
        keep past its deadline (`batching/shedding.py`): under overload it is answered now, in
        microseconds, instead of waiting out its deadline in the queue and being refused then,
        or executed for a caller that has gone. Only requests of its priority level or more
        urgent ones are ahead of it; with nothing ahead and a slot idle, nothing is shed."""
        busy = self._running >= self.policy.instances
        rows_ahead = sum(r for p, r in self._rows_by_priority.items() if p <= entry.priority)
        if not rows_ahead and not busy:
            return
        expected = expected_finish(
            self.policy,
            self._service,
            self._drain,
            rows_ahead,
            entry.rows,
            self._running_rows / self._running if busy else None,
        )
        if expected is None or now + expected <= deadline:
            return
        self._reject(RejectReason.SHED)
        raise QueueFull(
            f"model '{self.model}' version {self.version} is overloaded: the work queued ahead "
            f"would take ~{expected * 1e3:.1f} ms, past the request's deadline "
            f"({(deadline - now) * 1e3:.1f} ms from now)"
        )

    def _may_run_now(self, entry: QueuedRequest, now: float) -> bool:
        """Whether `entry` may skip the queue: nothing waits (nobody is overtaken), a slot is
        idle, and the policy would dispatch it alone right now."""
        return (
            not self._queued
            and not self._draining
            and self._running < self.policy.instances
            and self.policy.dispatch_at(
                entry.rows,
                now,
                now,
                (entry.rows,),
                next_arrival=self._arrivals.next_arrival() if self.policy.adaptive_delay else None,
            )
            <= now
        )

    def _run_inline(self, entry: QueuedRequest) -> InferResult | None:
        """The lone request on an idle slot, run at once on the event loop when the executor
        finds it short enough (`BatchExecutor.run_inline`): no queue, dispatcher wake-up, task
        or thread hand-off. None when the executor declines; the request then queues as usual.
        Synchronous throughout, so nothing else runs on the loop meanwhile: the slot it uses
        is the idle one, and no deadline can pass unseen."""
        batch = [entry]
        started = asyncio.get_running_loop().time()
        run: BatchRun | None = None
        error: Exception | None = None
        try:
            run = self._executor.run_inline([entry.request.inputs], self._union_of_outputs(batch))
        except Exception as exc:
            error = exc
        if run is None and error is None:
            return None
        entry.state = EntryState.RUNNING
        self._observer.batch_started(self.model, self.version, entry.rows, self._running + 1)
        queue_times = (started - entry.arrival,)
        self._finished(batch, run, error, started, entry.rows, queue_times, self._running, True)
        return entry.future.result()

    async def drain(self) -> None:
        """Stop accepting; execute everything already queued, without waiting for batches to
        fill; return once every accepted request has been answered."""
        self._draining = True
        self._wake.set()
        if self._dispatcher is not None:
            await self._dispatcher
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def close(self) -> None:
        """Drain, then refuse everything from now on."""
        await self.drain()
        self._closed = True

    def _reject(self, reason: RejectReason) -> None:
        self._observer.request_rejected(self.model, self.version, reason)

    def _unqueue(self, entry: QueuedRequest) -> bool:
        """Remove a still-queued entry (its caller gave up); False if it already left."""
        if entry.state is not EntryState.QUEUED:
            return False
        queue = self._queues[entry.key]
        queue.remove(entry)
        if not queue.count:
            del self._queues[entry.key]
        self._queued -= 1
        self._rows_by_priority[entry.priority] -= entry.rows
        entry.state = EntryState.GONE
        self._observer.queue_depth_changed(self.model, self.version, self._queued)
        return True

    async def _dispatch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            batch = await self._next_batch(loop)
            if batch is None:
                self._slots.release()
                return
            rows = sum(entry.rows for entry in batch)
            task = loop.create_task(self._execute(batch, rows, loop))
            self._running += 1
            self._running_rows += rows
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[QueuedRequest] | None:
        while True:
            now = loop.time()
            key, wake_at = next_queue(self._queues_as_policy_sees_them(now), now)
            if key is not None:
                batch = self._take_live(key, now)
                if batch:
                    return batch
                continue
            if self._draining:
                return None
            self._wake.clear()
            if wake_at is None:
                await self._wake.wait()
            else:
                await wait_until(self._wake, wake_at, fine=self._fine_timer)

    def _queues_as_policy_sees_them(
        self, now: float
    ) -> Iterator[tuple[tuple[Any, ...], float, float]]:
        """(key, oldest arrival, when it may dispatch) for each queue."""
        for key, queue in self._queues.items():
            oldest = queue.oldest_arrival()
            at = self.policy.dispatch_at(
                queue.rows,
                oldest,
                now,
                queue.rows_in_order(),
                draining=self._draining,
                next_arrival=(
                    self._arrivals.next_arrival() if self.policy.adaptive_delay else None
                ),
            )
            yield key, oldest, at

    def _take_live(self, key: tuple[Any, ...], now: float) -> list[QueuedRequest]:
        """Take the next batch from the queue under `key`, answering (never executing) entries
        whose deadline has passed or whose caller is gone."""
        queue = self._queues[key]
        batch = queue.take(
            self.policy.batch_size(queue.rows, queue.oldest_arrival(), now, queue.rows_in_order())
        )
        if not queue.count:
            del self._queues[key]
        rows = 0
        levels = self._rows_by_priority
        for entry in batch:
            rows += entry.rows
            levels[entry.priority] -= entry.rows
        self._queued -= len(batch)
        self._drain.taken(now, rows, self._queued > 0)
        self._observer.queue_depth_changed(self.model, self.version, self._queued)
        # A request whose answer would come after its deadline is not executed: its caller
        # will have gone (DEADLINE_EXCEEDED) by then.
        done_by = now + (self._service.predict(rows) or 0.0)
        live: list[QueuedRequest] = []
        for entry in batch:
            entry.state = EntryState.RUNNING
            deadline = entry.request.deadline
            if entry.future.done():
                self._reject(RejectReason.CANCELLED)
            elif deadline is not None and deadline < done_by:
                self._reject(RejectReason.DEADLINE)
                waited = f"{now - entry.arrival:.6f} s in the queue"
                entry.future.set_exception(
                    DeadlineExceeded(
                        f"deadline passed after {waited}"
                        if deadline <= now
                        else f"deadline would pass before its batch finished ({waited})"
                    )
                )
            else:
                live.append(entry)
        return live

    async def _execute(
        self, batch: list[QueuedRequest], rows: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        try:
            error = await self._run(batch, loop, answer_failure=len(batch) == 1)
            if error is None or len(batch) == 1:
                return
            if isinstance(error, asyncio.CancelledError):
                self._fail(batch, error)
                raise error
            # One request's bad data (an index out of range, say) must not fail the requests
            # that shared its batch: each runs again alone, and only those that fail again
            # get the error. Costs one run per request, only when a batch fails.
            for entry in batch:
                if not entry.future.done():
                    await self._run([entry], loop, answer_failure=True)
                elif not entry.reported:
                    # Its caller gave up while an earlier request of the batch ran again.
                    late = entry.request.deadline is not None and loop.time() >= (
                        entry.request.deadline
                    )
                    self._reject(RejectReason.DEADLINE if late else RejectReason.CANCELLED)
        finally:
            self._running -= 1
            self._running_rows -= rows
            self._slots.release()

    async def _run(
        self, batch: list[QueuedRequest], loop: asyncio.AbstractEventLoop, answer_failure: bool
    ) -> BaseException | None:
        """Execute once and answer each request its outputs; on failure, answer the error only
        when `answer_failure`. Returns the failure."""
        # This batch counts in `_running` while it runs.
        started, rows, queue_times, wanted = self._starting(batch, self._running)
        run: BatchRun | None = None
        error: BaseException | None = None
        try:
            run = await self._executor.execute([e.request.inputs for e in batch], wanted)
        except BaseException as exc:
            error = exc
        in_flight = self._running - 1
        return self._finished(
            batch, run, error, started, rows, queue_times, in_flight, answer_failure
        )

    def _starting(
        self, batch: list[QueuedRequest], in_flight: int
    ) -> tuple[float, int, tuple[float, ...], tuple[str, ...]]:
        """A batch leaves for the executor, `in_flight` batches running with it: (start time,
        rows, each request's queue time, the outputs to compute)."""
        rows = sum(entry.rows for entry in batch)
        started = asyncio.get_running_loop().time()
        queue_times = tuple(started - entry.arrival for entry in batch)
        self._observer.batch_started(self.model, self.version, rows, in_flight)
        return started, rows, queue_times, self._union_of_outputs(batch)

    def _finished(
        self,
        batch: list[QueuedRequest],
        run: BatchRun | None,
        error: BaseException | None,
        started: float,
        rows: int,
        queue_times: tuple[float, ...],
        in_flight: int,
        answer_failure: bool,
    ) -> BaseException | None:
        """Report a batch's run (`in_flight` batches still running) and answer its requests
        (see `_run`)."""
        if error is None and (run is None or len(run.outputs) != len(batch)):
            got = "nothing" if run is None else f"{len(run.outputs)} results"
            error = RuntimeError(f"executor returned {got} for {len(batch)} requests")
        compute_time = asyncio.get_running_loop().time() - started
        ok = run is not None and error is None
        if ok:
            self._service.observe(rows, compute_time)
        self._observer.batch_finished(
            BatchReport(
                model=self.model,
                version=self.version,
                rows=rows,
                queue_times=queue_times,
                trace_contexts=tuple(e.request.trace_context for e in batch),
                compute_time=compute_time,
                input_time=run.input_time if run and ok else 0.0,
                infer_time=run.infer_time if run and ok else 0.0,
                output_time=run.output_time if run and ok else 0.0,
                error=error,
                in_flight=in_flight,
                abandoned=tuple(e.future.done() for e in batch),
                retried=error is not None and not answer_failure,
            )
        )
        for entry in batch:
            if error is None or answer_failure or entry.future.done():
                entry.reported = True
        if error is not None or run is None:
            if answer_failure:
                self._fail(batch, error)
            return error
        for entry, outputs, queue_time in zip(batch, run.outputs, queue_times, strict=True):
            if entry.future.done():
                continue
            requested = entry.request.outputs
            try:
                selected = {n: outputs[n] for n in requested} if requested else outputs
            except KeyError as exc:
                entry.future.set_exception(
                    InferenceFailed(f"model '{self.model}' returned no output {exc}")
                )
                continue
            entry.future.set_result(
                InferResult(
                    model=self.model,
                    version=self.version,
                    outputs=selected,
                    queue_time=queue_time,
                    compute_time=compute_time,
                    batch_rows=rows,
                )
            )
        return None

    def _fail(self, batch: list[QueuedRequest], error: BaseException | None) -> None:
        rows = sum(entry.rows for entry in batch)
        failure = InferenceFailed(
            f"model '{self.model}' version {self.version} failed on a batch of {rows} rows: {error}"
        )
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(failure)

    @staticmethod
    def _union_of_outputs(batch: list[QueuedRequest]) -> tuple[str, ...]:
        names: dict[str, None] = {}
        for entry in batch:
            if not entry.request.outputs:
                return ()
            names.update(dict.fromkeys(entry.request.outputs))
        return tuple(names)


__all__ = ["BatchExecutor", "BatchRun", "Batcher", "BatchingPolicy"]
