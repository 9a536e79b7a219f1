"""One invocation of the harness: every target through every load level, interleaved.

On a shared, noisy machine two figures are only comparable when measured side by side, so the
order is: for each round, for each level, each target in turn. A slow minute then hurts every
target alike, and the ratios between them survive it. Rounds of the same level are merged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from inferd.loadtest.completions import MergedWindow
from inferd.loadtest.environment import describe_machine
from inferd.loadtest.inputs import build_payloads, rows_of
from inferd.loadtest.latency import LatencySummary, percentiles
from inferd.loadtest.levels import LoadLevel
from inferd.loadtest.runner import LevelResult, MeasurementPlan, WorkerPool, run_level
from inferd.loadtest.server_stats import ServerSplit
from inferd.loadtest.targets import open_driver
from inferd.loadtest.targets.target import TargetDriver, TargetSpec


@dataclass(frozen=True)
class Workload:
    """What each request carries."""

    client_batch: int = 1
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    files: Mapping[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0


@dataclass
class TargetReport:
    spec: TargetSpec
    description: dict[str, str]
    client_batch: int
    rows_per_request: int
    workers: int
    levels: list[LevelResult] = field(default_factory=list)


@dataclass
class SessionReport:
    targets: list[TargetReport]
    levels: list[LoadLevel]
    plan: MeasurementPlan
    rounds: int
    started: str
    elapsed_s: float
    machine: dict[str, object]
    notes: list[str] = field(default_factory=list)


def merge_rounds(results: Sequence[LevelResult]) -> LevelResult:
    """The rounds of one level on one target as one result."""
    if len(results) == 1:
        return results[0]
    splits = [r.server for r in results]
    server = None
    if all(s is not None for s in splits):
        server = ServerSplit.combine(s for s in splits if s is not None)
    first = results[0]
    cpu = [r.server_cpu_s for r in results]
    return LevelResult(
        target=first.target,
        level=first.level,
        client_batch=first.client_batch,
        windows=[w for r in results for w in r.windows],
        measured=MergedWindow.combine([r.measured for r in results]),
        stable=all(r.stable for r in results),
        stop_reason="; ".join(sorted({r.stop_reason for r in results})),
        server=server,
        cancelled=sum(r.cancelled for r in results),
        rounds=len(results),
        server_cpu_s=sum(c for c in cpu if c is not None) if None not in cpu else None,
    )


def _progress(spec: TargetSpec, level: LoadLevel, plan: MeasurementPlan, enabled: bool):  # type: ignore[no-untyped-def]
    from tqdm import tqdm  # type: ignore[import-untyped]

    total = plan.windows_for_duration()[0] if plan.duration_s else plan.max_windows
    bar = tqdm(
        total=None if plan.count else total,
        desc=f"{spec.name} {level.label}",
        unit="window",
        leave=False,
        # None: off where stderr is not a terminal (logs of `make bench`).
        disable=None if enabled else True,
    )

    def on_window(window: MergedWindow, _: int) -> None:
        (p99,) = percentiles(window.latencies, (99.0,))
        bar.update(1)
        bar.set_postfix_str(f"{window.requests_per_s:,.0f} req/s p99 {p99 * 1e3:.2f} ms")

    return bar, on_window


def run_session(
    targets: Sequence[TargetSpec],
    levels: Sequence[LoadLevel],
    plan: MeasurementPlan,
    workload: Workload,
    workers: int = 2,
    rounds: int = 1,
    time_limit_s: float = 1800.0,
    progress: bool = True,
) -> SessionReport:
    """Measure every target at every level; raises TargetError/RunError when a target cannot
    be driven at all."""
    from tqdm import tqdm

    started = datetime.now(UTC).isoformat(timespec="seconds")
    began = time.monotonic()
    notes: list[str] = []
    reports: list[TargetReport] = []
    drivers: list[TargetDriver] = []
    with contextlib.ExitStack() as stack:
        pools: list[WorkerPool] = []
        for spec in targets:
            driver = open_driver(spec)
            stack.callback(driver.close)
            drivers.append(driver)
            client_batch = spec.client_batch or workload.client_batch
            signature = driver.signature()
            payloads = build_payloads(
                signature, client_batch, workload.shapes, workload.files, workload.seed
            )
            rows = rows_of(payloads[0], signature.batched)
            # One in-process session per machine, as one server holds one per model.
            count = 1 if spec.kind == "inprocess" else workers
            pool = stack.enter_context(
                WorkerPool(spec, payloads, rows, count, plan.request_timeout_s)
            )
            pools.append(pool)
            reports.append(TargetReport(spec, driver.describe(), client_batch, rows, count))
        by_level: dict[tuple[int, int], list[LevelResult]] = {}
        level_id = 0
        for _ in range(rounds):
            for li, level in enumerate(levels):
                for ti, (pool, driver) in enumerate(zip(pools, drivers, strict=True)):
                    elapsed = time.monotonic() - began
                    if elapsed + plan.time_bound_s() > time_limit_s:
                        note = (
                            f"time limit {time_limit_s:.0f} s: skipped {pool.spec.name} "
                            f"{level.label} and what follows"
                        )
                        if note not in notes:
                            notes.append(note)
                        continue
                    bar, on_window = _progress(pool.spec, level, plan, progress)
                    try:
                        result = run_level(
                            pool, driver, level, level_id, plan, reports[ti].client_batch, on_window
                        )
                    finally:
                        bar.close()
                    level_id += 1
                    by_level.setdefault((ti, li), []).append(result)
                    if progress:
                        tqdm.write(_summary_line(result))
        for (ti, _), results in sorted(by_level.items()):
            reports[ti].levels.append(merge_rounds(results))
    return SessionReport(
        targets=reports,
        levels=list(levels),
        plan=plan,
        rounds=rounds,
        started=started,
        elapsed_s=time.monotonic() - began,
        machine=describe_machine(),
        notes=notes,
    )


def _summary_line(result: LevelResult) -> str:
    latency = LatencySummary.of(result.measured.latencies)
    errors = sum(result.measured.errors.values())
    server = ""
    if result.server is not None:
        server = (
            f"  server queue {result.server.mean_queue_ms:.3f} ms compute "
            f"{result.server.mean_compute_ms:.3f} ms batch {result.server.mean_batch_size:.2f}"
        )
    return (
        f"{result.target:<24} {result.level.label:<16} {result.requests_per_s:>9,.0f} req/s "
        f"p50 {latency.p50_ms:.3f} p99 {latency.p99_ms:.3f} ms  errors {errors}"
        f"{'' if result.stable else '  (unstable)'}{server}"
    )
