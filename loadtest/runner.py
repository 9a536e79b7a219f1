"""The coordinator: starts the worker processes, runs one load level at a time across them,
merges their windows, decides when a level has been measured, and reads the server's counters
at every window boundary.

A level is measured when its last three windows agree within the tolerance (throughput and
median latency), after `max_windows` windows at most, or — in the fixed modes — after a set
duration or request count. Every level is bounded in time whatever the server does.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import cast

import numpy as np

from inferd.loadtest.completions import MergedWindow, WindowSample
from inferd.loadtest.inputs import Payload
from inferd.loadtest.latency import agree_within
from inferd.loadtest.levels import LoadLevel
from inferd.loadtest.process_cpu import process_tree_cpu_s
from inferd.loadtest.server_stats import ServerCounters, ServerSplit
from inferd.loadtest.targets.target import TargetDriver, TargetSpec
from inferd.loadtest.worker import (
    LevelFinished,
    LevelOrder,
    Shutdown,
    StopLevel,
    WorkerFailed,
    WorkerReady,
    worker_main,
)

WORKER_START_TIMEOUT_S = 60.0
# What one worker process drives before the next one joins a level. Measured here against
# perf_analyzer on inferd (mlp, c=8, 2 cores shared with the server): 2 workers reached 592
# req/s where 1 reached 706 and perf_analyzer 690; one worker has driven over 2,000 req/s.
CALLERS_PER_WORKER = 16
RATE_PER_WORKER = 1000.0
# Lead time between sending a level's orders and its start, so all workers start together.
START_LEAD_S = 0.3


class RunError(RuntimeError):
    """The run cannot go on: a worker failed or died."""


@dataclass(frozen=True)
class MeasurementPlan:
    warmup_s: float = 2.0
    window_s: float = 5.0
    # Windows agree when each is within this fraction of their mean.
    tolerance: float = 0.10
    stable_windows: int = 3
    max_windows: int = 6
    # Fixed modes (either replaces the stability rule): measure this long / this many requests.
    duration_s: float | None = None
    count: int | None = None
    drain_s: float = 5.0
    # Open loop, per worker: requests outstanding before the scheduler waits (and sends late).
    max_in_flight: int = 1024
    request_timeout_s: float = 30.0

    def windows_for_duration(self) -> tuple[int, float]:
        """(windows, window length) that cover `duration_s` exactly."""
        assert self.duration_s is not None
        windows = max(1, round(self.duration_s / self.window_s))
        return windows, self.duration_s / windows

    def time_bound_s(self) -> float:
        """The longest a level can take, warm-up and drain included."""
        if self.duration_s is not None:
            measured = self.duration_s
        else:
            measured = self.window_s * self.max_windows
        return START_LEAD_S + self.warmup_s + measured + self.drain_s + 5.0


@dataclass
class LevelResult:
    target: str
    level: LoadLevel
    client_batch: int
    windows: list[MergedWindow]
    measured: MergedWindow
    stable: bool
    stop_reason: str
    server: ServerSplit | None
    cancelled: int = 0
    rounds: int = 1
    extras: dict[str, object] = field(default_factory=dict)
    # CPU seconds the server process (and its descendants) used over the measured windows;
    # None unless the target names its pid.
    server_cpu_s: float | None = None

    @property
    def requests_per_s(self) -> float:
        return self.measured.requests_per_s

    @property
    def answered(self) -> int:
        """Requests completed in the measured windows, successes and errors."""
        return int(self.measured.latencies.size) + sum(self.measured.errors.values())

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        if self.server_cpu_s is None or not self.answered:
            return None
        return self.server_cpu_s / self.answered * 1e3

    @property
    def rows_per_s(self) -> float:
        d = self.measured.duration
        return self.measured.rows / d if d > 0 else 0.0


class WorkerPool:
    """`workers` spawned processes driving one target; a context manager."""

    def __init__(
        self,
        spec: TargetSpec,
        payloads: Sequence[Payload],
        rows_per_request: int,
        workers: int,
        request_timeout_s: float,
    ) -> None:
        self.spec = spec
        self.size = workers
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(theirs, index, spec, list(payloads), rows_per_request, request_timeout_s),
                name=f"loadtest-worker-{index}",
                daemon=True,
            )
            self.connections.append(ours)
            self.processes.append(process)

    def __enter__(self) -> WorkerPool:
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        waiting = set(range(self.size))
        try:
            while waiting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RunError(f"{self.spec.name}: workers {sorted(waiting)} did not start")
                for conn in wait([self.connections[i] for i in waiting], timeout=remaining):
                    message = self.receive(cast(Connection, conn))
                    if isinstance(message, WorkerFailed):
                        raise RunError(f"{self.spec.name}: worker failed: {message.reason}")
                    if isinstance(message, WorkerReady):
                        waiting.discard(message.worker)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(self, conn: Connection) -> object:
        try:
            return conn.recv()
        except (EOFError, OSError):
            index = self.connections.index(conn)
            code = self.processes[index].exitcode
            raise RunError(f"{self.spec.name}: worker {index} died (exit code {code})") from None

    def close(self) -> None:
        for conn in self.connections:
            try:
                conn.send(Shutdown())
            except (OSError, ValueError):
                pass
        for process in self.processes:
            if process.pid is None:
                continue
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        for conn in self.connections:
            conn.close()

    def shares(self, level: LoadLevel) -> list[tuple[int, int, float, float]]:
        """(worker, concurrency, rate, phase) for every worker that takes part in `level`.

        A level uses as few workers as carry it (one per CALLERS_PER_WORKER callers or
        RATE_PER_WORKER requests/s, at most the pool): every extra process costs CPU that, on
        a small machine, the server under test shares.
        """
        if level.mode == "closed":
            used = min(self.size, max(1, math.ceil(level.concurrency / CALLERS_PER_WORKER)))
            base, extra = divmod(level.concurrency, used)
            counts = [base + (1 if i < extra else 0) for i in range(used)]
            return [(i, c, 0.0, 0.0) for i, c in enumerate(counts) if c > 0]
        used = min(self.size, max(1, math.ceil(level.rate / RATE_PER_WORKER)))
        share = level.rate / used
        return [(i, 0, share, i / level.rate) for i in range(used)]


Progress = Callable[[MergedWindow, int], None]


def measured_yet(windows: list[MergedWindow], plan: MeasurementPlan) -> tuple[str, bool] | None:
    """(stop reason, stable) once the level has been measured, else None."""
    if plan.count is not None:
        if sum(w.latencies.size for w in windows) >= plan.count:
            return "request count reached", True
        return None
    if plan.duration_s is not None:
        if len(windows) >= plan.windows_for_duration()[0]:
            return "duration reached", True
        return None
    if len(windows) >= plan.stable_windows:
        last = windows[-plan.stable_windows :]
        if agree_within([w.requests_per_s for w in last], plan.tolerance) and agree_within(
            [w.median_s for w in last], plan.tolerance
        ):
            return f"{plan.stable_windows} windows agree within {plan.tolerance:.0%}", True
    if len(windows) >= plan.max_windows:
        return f"not stable after {plan.max_windows} windows", False
    return None


def run_level(
    pool: WorkerPool,
    driver: TargetDriver,
    level: LoadLevel,
    level_id: int,
    plan: MeasurementPlan,
    client_batch: int,
    progress: Progress | None = None,
) -> LevelResult:
    shares = pool.shares(level)
    window_s = plan.window_s if plan.duration_s is None else plan.windows_for_duration()[1]
    start_at = time.monotonic() + START_LEAD_S
    first_boundary = start_at + plan.warmup_s
    for worker, concurrency, rate, phase in shares:
        pool.connections[worker].send(
            LevelOrder(
                level_id=level_id,
                mode=level.mode,
                concurrency=concurrency,
                rate=rate,
                arrival=level.arrival,
                phase=phase,
                seed=level_id * 1009 + worker,
                start_at=start_at,
                warmup_s=plan.warmup_s,
                window_s=window_s,
                max_in_flight=plan.max_in_flight,
                drain_s=plan.drain_s,
            )
        )
    active = [pool.connections[w] for w, *_ in shares]
    # The last window reaches us a little after its boundary; a slow machine gets 2 s grace.
    deadline = start_at + plan.time_bound_s() - plan.drain_s - 3.0
    snapshots: dict[int, ServerCounters | None] = {}
    cpu: dict[int, float | None] = {}
    pending: dict[int, list[WindowSample]] = {}
    windows: list[MergedWindow] = []
    decision: tuple[str, bool] | None = None

    def snapshot(k: int) -> None:
        if k not in snapshots:
            snapshots[k] = driver.counters()
            if pool.spec.pid is not None:
                cpu[k] = process_tree_cpu_s(pool.spec.pid)

    while decision is None:
        now = time.monotonic()
        if now >= deadline:
            decision = ("level time bound reached", False)
            break
        due = len(snapshots)
        boundary = first_boundary + due * window_s
        if now >= boundary:
            snapshot(due)
            continue
        for conn in wait(active, timeout=min(boundary, deadline) - now):
            message = pool.receive(cast(Connection, conn))
            if not isinstance(message, WindowSample) or message.level != level_id:
                continue
            pending.setdefault(message.index, []).append(message)
            if len(pending[message.index]) == len(active):
                merged = MergedWindow.of(pending.pop(message.index))
                windows.append(merged)
                snapshot(merged.index)
                snapshot(merged.index + 1)
                if progress is not None:
                    progress(merged, len(windows))
                decision = measured_yet(windows, plan)
                if decision is not None:
                    break
    for conn in active:
        conn.send(StopLevel(level_id))
    cancelled = _await_finished(pool, active, level_id, plan.drain_s + 10.0)
    reason, stable = decision
    used = windows if plan.duration_s or plan.count else windows[-plan.stable_windows :]
    server: ServerSplit | None = None
    server_cpu_s: float | None = None
    if used:
        before = snapshots.get(used[0].index)
        after = snapshots.get(used[-1].index + 1)
        if before is not None and after is not None:
            server = after.since(before)
        cpu_before, cpu_after = cpu.get(used[0].index), cpu.get(used[-1].index + 1)
        if cpu_before is not None and cpu_after is not None:
            server_cpu_s = cpu_after - cpu_before
        measured = MergedWindow.combine(used)
    else:
        measured = MergedWindow.of(
            [WindowSample(0, level_id, 0, 0.0, 0.0, latencies=np.empty(0), rows=0)]
        )
    return LevelResult(
        target=pool.spec.name,
        level=level,
        client_batch=client_batch,
        windows=windows,
        measured=measured,
        stable=stable,
        stop_reason=reason,
        server=server,
        cancelled=cancelled,
        server_cpu_s=server_cpu_s,
    )


def _await_finished(
    pool: WorkerPool, active: list[Connection], level_id: int, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    waiting = set(active)
    cancelled = 0
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RunError(f"{pool.spec.name}: workers did not stop within {timeout:.0f} s")
        for conn in wait(list(waiting), timeout=remaining):
            message = pool.receive(cast(Connection, conn))
            if isinstance(message, LevelFinished) and message.level_id == level_id:
                cancelled += message.cancelled
                waiting.discard(conn)
    return cancelled
