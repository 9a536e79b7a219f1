"""A load-generating worker process: one asyncio event loop driving one target.

The coordinator sends it one `LevelOrder` per load level; the worker starts its share of the
load at the agreed time (CLOCK_MONOTONIC is shared by every process on the machine, and the
event loop's clock is that clock), cuts a `WindowSample` at every window boundary and sends it
back, and stops when told. Samples carry raw latencies, so the coordinator's merge is exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

from inferd.loadtest.arrivals import Arrival, OpenLoopScheduler, arrivals
from inferd.loadtest.completions import CompletionLog
from inferd.loadtest.inputs import Payload
from inferd.loadtest.targets import open_sender
from inferd.loadtest.targets.target import RequestFailed, RequestSender, TargetSpec


@dataclass(frozen=True)
class LevelOrder:
    """One worker's share of one load level."""

    level_id: int
    mode: Literal["closed", "open"]
    # Closed loop: callers in this worker, each with one request outstanding.
    concurrency: int
    # Open loop: this worker's arrival rate (requests/s), arrival process and phase.
    rate: float
    arrival: Arrival
    phase: float
    seed: int
    # Loop time at which the load starts; measurement windows follow the warm-up.
    start_at: float
    warmup_s: float
    window_s: float
    max_in_flight: int
    drain_s: float


@dataclass(frozen=True)
class StopLevel:
    level_id: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class WorkerReady:
    worker: int


@dataclass(frozen=True)
class WorkerFailed:
    worker: int
    reason: str


@dataclass(frozen=True)
class LevelFinished:
    worker: int
    level_id: int
    # Requests still outstanding after the drain period, cancelled (never counted).
    cancelled: int


async def _sleep_until(when: float) -> None:
    loop = asyncio.get_running_loop()
    delay = when - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


class LevelRun:
    """Generates one level's load and cuts its windows."""

    def __init__(
        self, worker: int, order: LevelOrder, sender: RequestSender, payloads: int, rows: int
    ) -> None:
        self.worker = worker
        self.order = order
        self.sender = sender
        self.payloads = payloads
        self.log = CompletionLog(rows, open_loop=order.mode == "open")
        self.stop = asyncio.Event()
        self._next_payload = worker % payloads

    def _payload_index(self) -> int:
        index = self._next_payload
        self._next_payload = (index + 1) % self.payloads
        return index

    async def closed_caller(self) -> None:
        loop = asyncio.get_running_loop()
        await _sleep_until(self.order.start_at)
        while not self.stop.is_set():
            began = loop.time()
            try:
                await self.sender.send(self._payload_index())
            except RequestFailed as failure:
                self.log.failure(loop.time(), failure.code)
            else:
                done = loop.time()
                self.log.success(done, done - began)

    async def send_at(self, intended: float) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            await self.sender.send(self._payload_index())
        except RequestFailed as failure:
            self.log.failure(loop.time(), failure.code)
        else:
            done = loop.time()
            self.log.success(done, done - intended, sent - intended)

    async def cut_windows(self, conn: Connection) -> None:
        order = self.order
        first = order.start_at + order.warmup_s
        await _sleep_until(first)
        self.log.discard_before(first)
        index = 0
        while True:
            end = first + (index + 1) * order.window_s
            await _sleep_until(end)
            conn.send(self.log.cut(self.worker, order.level_id, index, end - order.window_s, end))
            index += 1

    async def run(self, conn: Connection, inbox: asyncio.Queue[object]) -> bool:
        """Run until the coordinator stops this level; False when it asked to shut down."""
        order = self.order
        tasks: list[asyncio.Task[None]] = []
        scheduler: OpenLoopScheduler | None = None
        if order.mode == "closed":
            tasks = [asyncio.create_task(self.closed_caller()) for _ in range(order.concurrency)]
        else:
            offsets = arrivals(order.arrival, order.rate, phase=order.phase, seed=order.seed)
            scheduler = OpenLoopScheduler(self.send_at, offsets, order.max_in_flight)
            tasks = [asyncio.create_task(scheduler.run(order.start_at, self.stop))]
        cutter = asyncio.create_task(self.cut_windows(conn))
        keep_running = True
        while True:
            message = await inbox.get()
            if isinstance(message, Shutdown):
                keep_running = False
                break
            if isinstance(message, StopLevel) and message.level_id == order.level_id:
                break
        self.stop.set()
        cutter.cancel()
        cancelled = await self._drain(tasks, scheduler)
        conn.send(LevelFinished(self.worker, order.level_id, cancelled))
        return keep_running

    async def _drain(
        self, tasks: Sequence[asyncio.Task[None]], scheduler: OpenLoopScheduler | None
    ) -> int:
        _, pending = await asyncio.wait(tasks, timeout=self.order.drain_s) if tasks else ((), ())
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = len(pending) if scheduler is None else 0
        if scheduler is not None:
            cancelled += await scheduler.drain(self.order.drain_s)
        return cancelled


async def _serve(
    conn: Connection,
    worker: int,
    spec: TargetSpec,
    payloads: Sequence[Payload],
    rows: int,
    timeout_s: float,
) -> None:
    loop = asyncio.get_running_loop()
    try:
        sender = open_sender(spec, payloads, timeout_s)
    except Exception as exc:
        conn.send(WorkerFailed(worker, f"{type(exc).__name__}: {exc}"))
        return
    inbox: asyncio.Queue[object] = asyncio.Queue()

    def on_readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(Shutdown())

    loop.add_reader(conn.fileno(), on_readable)
    conn.send(WorkerReady(worker))
    try:
        while True:
            message = await inbox.get()
            if isinstance(message, Shutdown):
                break
            if isinstance(message, LevelOrder):
                level = LevelRun(worker, message, sender, len(payloads), rows)
                if not await level.run(conn, inbox):
                    break
    finally:
        loop.remove_reader(conn.fileno())
        await sender.close()


def worker_main(
    conn: Connection,
    worker: int,
    spec: TargetSpec,
    payloads: Sequence[Payload],
    rows: int,
    timeout_s: float,
) -> None:
    """Process entry point (spawned: gRPC does not survive fork)."""
    try:
        asyncio.run(_serve(conn, worker, spec, payloads, rows, timeout_s))
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
