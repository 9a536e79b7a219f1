"""`inferd serve --workers N` measured: what each of its processes spends per request, the ceiling
that projects on a bigger machine, and what N frontends buy on this one.

    python -m inferd.loadtest.bench.workers --out docs/benchmarks/workers
    python -m inferd.loadtest.bench --only 9          # the same, as a scenario of `make bench`

Two servers on the bench repository, started once and measured interleaved: `--workers 1` (one
process does everything) and `--workers N` (a supervisor, one engine process holding the
models, N gRPC frontends sharing the port; frontends found as the supervisor's children by
their command line).

1. CPU per request, by role: per model, a fixed number of requests, closed loop at
   `--concurrency` callers over `--connections` HTTP/2 connections (the kernel gives each
   connection to one frontend), from this process's grpc.aio (pre-serialised requests, no
   client library); each process's user + system time (/proc/PID/stat) around the measured
   requests, divided by them. Interleaved in rounds, each round a warm-up and then its share of
   the requests on each server. From the figures: engine ÷ frontend CPU per request (the goal:
   at most 1/8), the ceiling projected on a machine of `--cores` cores (one core for the
   engine, the rest for frontends: min((cores - 1) ÷ frontends' CPU per request, 1 ÷ the
   engine's)) and the engine's own ceiling (1 ÷ its CPU per request).
2. `--workers N` against `--workers 1` through the harness (`inferd-loadtest --compare`, levels
   interleaved, `connections=` per load-generating process), closed loop: req/s, latency and
   the server's CPU per request (its whole process tree).

On a 2-core machine the load generator takes a core of its own, so N frontends cannot show
much there; part 1 is what carries to a bigger machine.

    python -m inferd.loadtest.bench.workers --scale 1,2,4,8 --harness-workers 6 --out DIR

is the GPU check's part (scripts/gpu_check.sh): the tiny model alone, each `--workers N` started
in turn and loaded through the harness at `--scale-levels`; its best req/s against one
process's (goal: at least 0.7·N), and the cores each role kept busy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.bench.scenario import (
    BenchContext,
    Scenario,
    ScenarioResult,
    figure_links,
    fmt,
    markdown_table,
    measure,
)
from inferd.loadtest.environment import describe_machine
from inferd.loadtest.inputs import build_payloads
from inferd.loadtest.latency import LatencySummary
from inferd.loadtest.levels import LoadLevel, closed_levels
from inferd.loadtest.process_cpu import CLOCK_TICKS
from inferd.loadtest.report import write_json
from inferd.loadtest.runner import LevelResult, MeasurementPlan
from inferd.loadtest.server_process import InferdProcess, start_inferd
from inferd.loadtest.session import SessionReport, Workload, run_session
from inferd.loadtest.targets.channels import SenderChannels
from inferd.loadtest.targets.native import PREDICT_METHOD, NativeDriver, encode_predict_request
from inferd.loadtest.targets.target import TargetSpec

PROC = Path("/proc")
# The goal: the engine spends at most this fraction of a frontend's CPU per request.
ENGINE_GOAL = 1 / 8
REQUEST_TIMEOUT_S = 30.0
# Fixed-length levels for part 2 (the scenario's [plan] replaces it under `make bench`).
DEFAULT_PLAN = MeasurementPlan(warmup_s=1.0, window_s=1.5, duration_s=3.0)
QUICK_PLAN = MeasurementPlan(warmup_s=0.5, window_s=1.0, duration_s=1.0)


class WorkersError(RuntimeError):
    """The server's processes are not what `--workers N` should have started."""


@dataclass(frozen=True)
class Options:
    models: tuple[str, ...] = ("tiny", "cnn")
    # Frontends of the multi-process server (the other server is `--workers 1`).
    frontends: int = 2
    # HTTP/2 connections: the kernel balances them, not requests, over the frontends.
    connections: int = 8
    # Part 1: closed-loop callers and measured requests per model (split over the rounds).
    cpu_concurrency: int = 16
    cpu_requests: Mapping[str, int] = field(default_factory=lambda: {"tiny": 20000, "cnn": 2000})
    # Part 2: closed-loop levels per model.
    levels: Mapping[str, Sequence[int]] = field(
        default_factory=lambda: {"tiny": [1, 8, 32], "cnn": [1, 8]}
    )
    # The machine the projection is for.
    cores: int = 16
    rounds: int = 2
    plan: MeasurementPlan = DEFAULT_PLAN
    # Load-generating processes of the harness (part 2).
    harness_workers: int = 2
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> Options:
        p = scenario.params
        base = cls()
        return cls(
            models=tuple(p.get("models", base.models)),
            frontends=int(p.get("frontends", base.frontends)),
            connections=int(p.get("connections", base.connections)),
            cpu_concurrency=int(p.get("cpu_concurrency", base.cpu_concurrency)),
            cpu_requests={k: int(v) for k, v in p.get("cpu_requests", base.cpu_requests).items()},
            levels={k: [int(c) for c in v] for k, v in p.get("levels", base.levels).items()},
            cores=int(p.get("cores", base.cores)),
            rounds=scenario.rounds,
            plan=scenario.plan,
            harness_workers=scenario.workers,
        )

    def requests_for(self, model: str) -> int:
        return self.cpu_requests.get(model, 2000)


# -- the server's processes ------------------------------------------------------------------


def _stat_ppid(pid: int) -> int | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(text[text.rfind(")") + 2 :].split()[1])


def worker_pids(server: InferdProcess) -> dict[str, list[int]]:
    """The supervisor's children by role, from their command lines (`python -m inferd.workers
    engine|frontend ...`): {"engine": [pid], "frontend": [pid, ...]}."""
    roles: dict[str, list[int]] = {"engine": [], "frontend": []}
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or _stat_ppid(int(entry.name)) != server.process.pid:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "inferd.workers" in args[:-1]:
            role = args[args.index("inferd.workers") + 1]
            roles.setdefault(role, []).append(int(entry.name))
    return {role: sorted(pids) for role, pids in roles.items()}


def expect_roles(server: InferdProcess, frontends: int) -> dict[str, list[int]]:
    roles = worker_pids(server)
    if len(roles["engine"]) != 1 or len(roles["frontend"]) != frontends:
        raise WorkersError(
            f"expected 1 engine and {frontends} frontends under pid {server.process.pid}, "
            f"found {roles}\n{server.describe()}"
        )
    return roles


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` alone (all its threads, not its children)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        raise WorkersError(f"pid {pid} is gone (a process of the server exited)") from None
    fields = text[text.rfind(")") + 2 :].split()
    # utime and stime: fields 14 and 15 of stat(5), 11 and 12 after the command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def frontend_requests(metrics_port: int) -> dict[int, float]:
    """inferd_worker_requests_total by frontend pid (the engine's /metrics)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inferd_worker_requests_total" and "worker_pid" in sample.labels:
                out[int(sample.labels["worker_pid"])] = sample.value
    return out


# -- part 1: CPU per request by role ----------------------------------------------------------


@dataclass
class RoleCost:
    """One server, one model: what each of its processes spent per answered request."""

    model: str
    workers: int
    requests: int
    errors: int
    concurrency: int
    connections: int
    seconds: float
    p50_ms: float
    p99_ms: float
    # µs of CPU per request: the whole server (its process tree), and by role (--workers N).
    total_us: float
    engine_us: float | None = None
    frontends_us: float | None = None
    supervisor_us: float | None = None
    per_frontend_us: list[float] = field(default_factory=list)
    # Requests each frontend answered (same order as per_frontend_us), from /metrics.
    per_frontend_requests: list[int] = field(default_factory=list)
    # This process (the load generator) per request.
    client_us: float = 0.0
    mean_batch: float | None = None

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def label(self) -> str:
        return "single process" if self.workers == 1 else f"{self.workers} frontends + engine"


@dataclass
class _Tally:
    """What the measured blocks of one server and model added up to."""

    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    client_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: Counter[int] = field(default_factory=Counter)
    frontend_requests: Counter[int] = field(default_factory=Counter)
    rows: int = 0
    executions: int = 0


class _Server:
    """One of the two servers, with what part 1 needs to read around a block."""

    def __init__(self, process: InferdProcess, frontends: int) -> None:
        self.process = process
        self.workers = frontends
        self.roles = expect_roles(process, frontends) if frontends > 1 else {}

    @property
    def pids(self) -> list[int]:
        return [self.process.process.pid, *(p for ps in self.roles.values() for p in ps)]

    def cpu(self) -> dict[int, float]:
        return {pid: cpu_s(pid) for pid in self.pids}

    def check_unchanged(self) -> None:
        if self.workers > 1 and worker_pids(self.process) != self.roles:
            raise WorkersError(
                f"the server's processes changed during the run (a restart?): "
                f"{self.roles} -> {worker_pids(self.process)}\n{self.process.describe()}"
            )


def _target(server: InferdProcess, model: str, label: str, connections: int) -> TargetSpec:
    return TargetSpec(
        "native",
        server.target,
        model,
        label=label,
        pid=server.process.pid,
        connections=connections,
    )


def _requests(spec: TargetSpec) -> tuple[list[bytes], NativeDriver]:
    driver = NativeDriver(spec)
    payloads = build_payloads(driver.signature(), 1, distinct=16)
    return [encode_predict_request(spec, p) for p in payloads], driver


async def _closed_loop(
    call: Callable[[], grpc.aio.UnaryUnaryMultiCallable],
    requests: Sequence[bytes],
    count: int,
    concurrency: int,
    latencies: list[float] | None,
) -> int:
    """`count` requests from `concurrency` callers, each with one outstanding; the errors."""
    sent = 0
    errors = 0

    async def caller() -> None:
        nonlocal sent, errors
        while sent < count:
            payload = requests[sent % len(requests)]
            sent += 1
            started = time.perf_counter()
            try:
                await call()(payload, timeout=REQUEST_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            if latencies is not None:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(min(concurrency, count))))
    return errors


async def _block(
    server: _Server,
    spec: TargetSpec,
    requests: Sequence[bytes],
    driver: NativeDriver,
    warmup: int,
    count: int,
    concurrency: int,
    tally: _Tally,
) -> None:
    """New connections, `warmup` requests, then `count` measured with every process's CPU
    read around them (the server's counters and /metrics outside that span)."""
    channels = SenderChannels(spec)
    try:
        call = channels.in_turn(PREDICT_METHOD)
        await _closed_loop(call, requests, warmup, concurrency, None)
        metrics_port = server.process.metrics_port
        before_requests = frontend_requests(metrics_port) if server.workers > 1 else {}
        before_counters = driver.counters()
        before = server.cpu()
        client = time.process_time()
        started = time.perf_counter()
        latencies: list[float] = []
        errors = await _closed_loop(call, requests, count, concurrency, latencies)
        elapsed = time.perf_counter() - started
        client = time.process_time() - client
        after = server.cpu()
        after_counters = driver.counters()
        after_requests = frontend_requests(metrics_port) if server.workers > 1 else {}
    finally:
        await channels.close()
    server.check_unchanged()
    tally.requests += count
    tally.errors += errors
    tally.seconds += elapsed
    tally.client_s += client
    tally.latencies += latencies
    tally.cpu.update({pid: after[pid] - before[pid] for pid in after})
    tally.frontend_requests.update(
        {pid: int(v - before_requests.get(pid, 0.0)) for pid, v in after_requests.items()}
    )
    if before_counters is not None and after_counters is not None:
        split = after_counters.since(before_counters)
        tally.rows += split.rows
        tally.executions += split.executions


def _cost(server: _Server, model: str, options: Options, tally: _Tally) -> RoleCost:
    answered = max(tally.requests, 1)

    def us(seconds: float) -> float:
        return seconds / answered * 1e6

    latency = LatencySummary.of(np.array(tally.latencies))
    cost = RoleCost(
        model=model,
        workers=server.workers,
        requests=tally.requests,
        errors=tally.errors,
        concurrency=options.cpu_concurrency,
        connections=options.connections,
        seconds=tally.seconds,
        p50_ms=latency.p50_ms,
        p99_ms=latency.p99_ms,
        # The server process and, with --workers N, its children (every process of it).
        total_us=us(sum(tally.cpu.values())),
        client_us=us(tally.client_s),
        mean_batch=tally.rows / tally.executions if tally.executions else None,
    )
    if server.workers > 1:
        engine = server.roles["engine"][0]
        frontends = server.roles["frontend"]
        cost.engine_us = us(tally.cpu[engine])
        cost.per_frontend_us = [us(tally.cpu[p]) for p in frontends]
        cost.frontends_us = sum(cost.per_frontend_us)
        cost.supervisor_us = us(tally.cpu[server.process.process.pid])
        cost.per_frontend_requests = [tally.frontend_requests[p] for p in frontends]
    return cost


async def role_costs(servers: Sequence[_Server], model: str, options: Options) -> list[RoleCost]:
    """Part 1 for one model: the servers in turn, `options.rounds` times."""
    count = options.requests_for(model)
    per_round = max(1, count // options.rounds)
    warmup = max(100, per_round // 10)
    tallies = [_Tally() for _ in servers]
    prepared = []
    for server in servers:
        spec = _target(server.process, model, f"workers {server.workers}", options.connections)
        prepared.append((spec, *_requests(spec)))
    try:
        for _ in range(options.rounds):
            for server, (spec, requests, driver), tally in zip(
                servers, prepared, tallies, strict=True
            ):
                await _block(
                    server,
                    spec,
                    requests,
                    driver,
                    warmup,
                    per_round,
                    options.cpu_concurrency,
                    tally,
                )
    finally:
        for _, _, driver in prepared:
            driver.close()
    return [_cost(s, model, options, t) for s, t in zip(servers, tallies, strict=True)]


@dataclass
class Projection:
    """What the per-role figures of one model say about a machine of `cores` cores."""

    model: str
    cores: int
    frontends_us: float
    engine_us: float
    single_us: float

    @property
    def engine_over_frontend(self) -> float:
        return self.engine_us / self.frontends_us

    @property
    def goal_met(self) -> bool:
        return self.engine_over_frontend <= ENGINE_GOAL

    @property
    def frontends_ceiling(self) -> float:
        """Requests/s that `cores - 1` cores of frontends can parse and answer."""
        return (self.cores - 1) / self.frontends_us * 1e6

    @property
    def engine_ceiling(self) -> float:
        """Requests/s the engine can take if it had a core to itself and needed no more."""
        return 1e6 / self.engine_us

    @property
    def projected(self) -> float:
        return min(self.frontends_ceiling, self.engine_ceiling)

    @property
    def bound_by(self) -> str:
        return "engine" if self.engine_ceiling < self.frontends_ceiling else "frontends"

    @property
    def single_ceiling(self) -> float:
        """One process, one core's worth: 1 ÷ its CPU per request."""
        return 1e6 / self.single_us

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "engine_over_frontend": self.engine_over_frontend,
            "goal": ENGINE_GOAL,
            "goal_met": self.goal_met,
            "frontends_ceiling": self.frontends_ceiling,
            "engine_ceiling": self.engine_ceiling,
            "projected": self.projected,
            "bound_by": self.bound_by,
            "single_ceiling": self.single_ceiling,
        }


def project(costs: Sequence[RoleCost], cores: int) -> Projection | None:
    single = next((c for c in costs if c.workers == 1), None)
    multi = next((c for c in costs if c.workers > 1), None)
    if single is None or multi is None or not multi.engine_us or not multi.frontends_us:
        return None
    return Projection(multi.model, cores, multi.frontends_us, multi.engine_us, single.total_us)


# -- part 2: N workers against 1 through the harness ------------------------------------------


@dataclass(frozen=True)
class LevelComparison:
    model: str
    level: str
    single: LevelResult
    multi: LevelResult

    def _ratio(self, a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    @property
    def rps_ratio(self) -> float | None:
        return self._ratio(self.multi.requests_per_s, self.single.requests_per_s)

    def p(self, result: LevelResult, q: str) -> float:
        summary = LatencySummary.of(result.measured.latencies)
        return float(getattr(summary, q))

    @property
    def p50_ratio(self) -> float | None:
        return self._ratio(self.p(self.multi, "p50_ms"), self.p(self.single, "p50_ms"))

    @property
    def p99_ratio(self) -> float | None:
        return self._ratio(self.p(self.multi, "p99_ms"), self.p(self.single, "p99_ms"))

    @staticmethod
    def cpu_us(result: LevelResult) -> float | None:
        ms = result.server_cpu_ms_per_request
        return ms * 1e3 if ms is not None else None

    @property
    def cpu_ratio(self) -> float | None:
        return self._ratio(self.cpu_us(self.multi), self.cpu_us(self.single))

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "level": self.level,
            "single_requests_per_s": self.single.requests_per_s,
            "multi_requests_per_s": self.multi.requests_per_s,
            "requests_per_s_ratio": self.rps_ratio,
            "single_p50_ms": self.p(self.single, "p50_ms"),
            "multi_p50_ms": self.p(self.multi, "p50_ms"),
            "single_p99_ms": self.p(self.single, "p99_ms"),
            "multi_p99_ms": self.p(self.multi, "p99_ms"),
            "p50_ratio": self.p50_ratio,
            "p99_ratio": self.p99_ratio,
            "single_cpu_us_per_request": self.cpu_us(self.single),
            "multi_cpu_us_per_request": self.cpu_us(self.multi),
            "cpu_ratio": self.cpu_ratio,
            "errors": sum(self.single.measured.errors.values())
            + sum(self.multi.measured.errors.values()),
        }


SessionRunner = Callable[[str, Sequence[TargetSpec], Sequence[LoadLevel]], SessionReport]


def compare(
    single: InferdProcess,
    multi: InferdProcess,
    model: str,
    options: Options,
    run: SessionRunner,
) -> tuple[SessionReport, list[LevelComparison]]:
    labels = ("workers 1", f"workers {options.frontends}")
    targets = [
        _target(server, model, label, options.connections)
        for server, label in zip((single, multi), labels, strict=True)
    ]
    levels = closed_levels(",".join(str(c) for c in options.levels[model]))
    session = run(model, targets, levels)
    a, b = session.targets
    return session, [
        LevelComparison(model, x.level.label, x, y)
        for x, y in zip(a.levels, b.levels, strict=False)
    ]


# -- the whole benchmark ----------------------------------------------------------------------


@dataclass
class WorkersBenchmark:
    options: Options
    costs: list[RoleCost]
    projections: list[Projection]
    comparisons: list[LevelComparison]
    notes: list[str]
    sessions: dict[str, SessionReport]

    def record(self) -> dict[str, Any]:
        options = asdict(self.options)
        options["plan"] = asdict(self.options.plan)
        return {
            "tool": "inferd.loadtest.bench.workers",
            "machine": describe_machine(),
            "options": options,
            "cpu_per_request": [
                {**asdict(c), "requests_per_s": c.requests_per_s} for c in self.costs
            ],
            "projections": [p.as_dict() for p in self.projections],
            "comparisons": [c.as_dict() for c in self.comparisons],
            "notes": self.notes,
        }


def run_benchmark(
    repository: Path,
    workdir: Path,
    options: Options,
    run: SessionRunner,
) -> WorkersBenchmark:
    """Start `--workers 1` and `--workers N` on `repository`, measure both parts, stop them."""
    workdir.mkdir(parents=True, exist_ok=True)
    single = start_inferd(repository, workdir / "workers-1.log", env=options.env)
    try:
        multi = start_inferd(
            repository,
            workdir / f"workers-{options.frontends}.log",
            env=options.env,
            extra_args=["--workers", str(options.frontends)],
        )
    except BaseException:
        single.stop()
        raise
    notes: list[str] = []
    costs: list[RoleCost] = []
    comparisons: list[LevelComparison] = []
    sessions: dict[str, SessionReport] = {}
    try:
        servers = [_Server(single, 1), _Server(multi, options.frontends)]
        for model in options.models:
            print(f"workers: {model}: CPU per request by role ...", flush=True)
            costs += asyncio.run(role_costs(servers, model, options))
        for model in [m for m in options.models if options.levels.get(m)]:
            print(f"workers: {model}: workers {options.frontends} against 1 ...", flush=True)
            session, compared = compare(single, multi, model, options, run)
            sessions[model] = session
            comparisons += compared
            notes += session.notes
        servers[1].check_unchanged()
    finally:
        multi.stop()
        single.stop()
    for server in (single, multi):
        tracebacks = server.log_text().count("Traceback")
        if tracebacks:
            notes.append(f"{tracebacks} tracebacks in the log of {server.log_path.name}")
    projections = [
        p
        for model in options.models
        if (p := project([c for c in costs if c.model == model], options.cores)) is not None
    ]
    return WorkersBenchmark(options, costs, projections, comparisons, notes, sessions)


# -- tables -----------------------------------------------------------------------------------


def _us(value: float | None) -> str:
    return fmt(value, 0) if value is not None else "-"


def cost_table(costs: Sequence[RoleCost]) -> str:
    rows = []
    for c in costs:
        frontends = "-"
        if c.per_frontend_us:
            each = " + ".join(_us(v) for v in c.per_frontend_us)
            frontends = f"{_us(c.frontends_us)} ({each})"
        shares = "-"
        if c.per_frontend_requests and sum(c.per_frontend_requests):
            total = sum(c.per_frontend_requests)
            shares = " / ".join(f"{n / total:.0%}" for n in c.per_frontend_requests)
        rows.append(
            [
                c.model,
                c.label,
                f"{c.requests:,}" + (f" ({c.errors} errors)" if c.errors else ""),
                fmt(c.requests_per_s, 0),
                fmt(c.p50_ms, 3),
                frontends,
                _us(c.engine_us),
                _us(c.supervisor_us),
                _us(c.total_us),
                fmt(c.mean_batch) if c.mean_batch is not None else "-",
                shares,
                _us(c.client_us),
            ]
        )
    return markdown_table(
        (
            "model",
            "server",
            "requests",
            "req/s",
            "p50 ms",
            "frontends µs (each)",
            "engine µs",
            "supervisor µs",
            "whole server µs",
            "mean batch",
            "requests per frontend",
            "load generator µs",
        ),
        rows,
    )


def projection_table(projections: Sequence[Projection]) -> str:
    rows = [
        [
            p.model,
            f"{fmt(p.engine_over_frontend, 3)} ({'met' if p.goal_met else 'NOT met'})",
            fmt(p.frontends_ceiling, 0),
            fmt(p.engine_ceiling, 0),
            f"{fmt(p.projected, 0)} ({p.bound_by})",
            fmt(p.single_ceiling, 0),
            fmt(p.projected / p.single_ceiling),
        ]
        for p in projections
    ]
    cores = projections[0].cores if projections else 16
    return markdown_table(
        (
            "model",
            f"engine ÷ frontends CPU/request (goal ≤ {ENGINE_GOAL:.3f})",
            f"frontends' ceiling ({cores - 1} cores) req/s",
            "engine ceiling (1 core) req/s",
            f"projected {cores}-core ceiling req/s (bound by)",
            "single process (1 ÷ its CPU) req/s",
            "projected ÷ single",
        ),
        rows,
    )


def comparison_table(comparisons: Sequence[LevelComparison], frontends: int) -> str:
    rows = [
        [
            c.model,
            c.level,
            fmt(c.single.requests_per_s, 0),
            fmt(c.multi.requests_per_s, 0),
            fmt(c.rps_ratio),
            f"{fmt(c.p(c.single, 'p50_ms'), 3)} / {fmt(c.p(c.multi, 'p50_ms'), 3)}",
            fmt(c.p50_ratio),
            f"{fmt(c.p(c.single, 'p99_ms'), 3)} / {fmt(c.p(c.multi, 'p99_ms'), 3)}",
            fmt(c.p99_ratio),
            f"{_us(c.cpu_us(c.single))} / {_us(c.cpu_us(c.multi))}",
            fmt(c.cpu_ratio),
        ]
        for c in comparisons
    ]
    n = frontends
    return markdown_table(
        (
            "model",
            "level",
            "req/s, 1",
            f"req/s, {n}",
            f"{n} ÷ 1 req/s",
            "p50 ms, 1 / N",
            "p50",
            "p99 ms, 1 / N",
            "p99",
            "server CPU µs/request, 1 / N",
            "CPU",
        ),
        rows,
    )


def tables(bench: WorkersBenchmark) -> list[str]:
    out = [cost_table(bench.costs), projection_table(bench.projections)]
    if bench.comparisons:
        out.append(comparison_table(bench.comparisons, bench.options.frontends))
    return out


def _method(options: Options) -> str:
    plan = options.plan
    requests = ", ".join(f"{m} {options.requests_for(m):,}" for m in options.models)
    return (
        f"Two inferd on the bench repository, measured interleaved: `--workers 1` (one process) "
        f"and `--workers {options.frontends}` (a supervisor, one engine process holding the "
        f"models, {options.frontends} gRPC frontends on one port). First, CPU per request by "
        f"process: a fixed number of one-row requests per model ({requests}), closed loop at "
        f"c={options.cpu_concurrency} over {options.connections} HTTP/2 connections (the kernel "
        "gives each connection to one frontend), in "
        f"{options.rounds} interleaved round(s) each after its own warm-up; each process's "
        "user + system time from /proc/PID/stat around the measured requests, divided by them. "
        f"The projection is for {options.cores} cores: one for the engine, the rest for "
        "frontends, min((cores - 1) ÷ the frontends' CPU per request, 1 ÷ the engine's). Then "
        "the two servers through the harness, levels interleaved "
        f"({plan.warmup_s:g} s warm-up, {plan.duration_s or plan.window_s:g} s measured, "
        f"{options.rounds} round(s) merged, connections={options.connections} per "
        "load-generating process); server CPU is the whole process tree's."
    )


def headline(bench: WorkersBenchmark) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for p in bench.projections:
        out.append(
            (
                f"engine ÷ frontends CPU per request ({p.model})",
                f"{fmt(p.engine_over_frontend, 3)} (goal ≤ {ENGINE_GOAL:.3f}: "
                f"{'met' if p.goal_met else 'not met'})",
            )
        )
        out.append(
            (
                f"  projected {p.cores}-core ceiling ({p.model})",
                f"{fmt(p.projected, 0)} req/s ({p.bound_by}-bound; one process "
                f"{fmt(p.single_ceiling, 0)})",
            )
        )
    n = bench.options.frontends
    for model in bench.options.models:
        levels = [c for c in bench.comparisons if c.model == model]
        if levels:
            out.append(
                (
                    f"workers {n} ÷ workers 1 req/s ({model}, this machine)",
                    ", ".join(f"{c.level}: {fmt(c.rps_ratio)}" for c in levels),
                )
            )
    return out


# -- `make bench` scenario --------------------------------------------------------------------


def workers_scenario(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    options = Options.from_scenario(scenario)

    def run(name: str, targets: Sequence[TargetSpec], levels: Sequence[LoadLevel]) -> SessionReport:
        return measure(ctx, scenario, f"workers-{name}", targets, levels)

    bench = run_benchmark(ctx.repository, ctx.workdir / "workers", options, run)
    ctx.results.mkdir(parents=True, exist_ok=True)
    (ctx.results / f"s{scenario.id}-workers.json").write_text(
        json.dumps(bench.record(), indent=1) + "\n"
    )
    print("\n\n".join(tables(bench)), flush=True)
    body = [
        _method(options),
        *tables(bench),
        "On this 2-core machine the load generator needs a core of its own, so "
        f"{options.frontends} frontends have little to gain here: the CPU per request by "
        'process is what carries to a machine with more cores. The section "Workers" '
        "reads one run of this benchmark.",
        *(f"Note: {n}" for n in bench.notes),
        *(figure_links(ctx, scenario, f"workers-{m}") for m in options.models),
    ]
    return ScenarioResult(scenario, headline=headline(bench), body=body)


# -- scaling: --workers N for several N (the GPU check) ---------------------------------------


# The goal: N frontends serve at least this fraction of N times what one process serves.
SCALE_GOAL = 0.7


@dataclass
class ScalePoint:
    """One server (`--workers N`) at its best level."""

    workers: int
    level: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float | None
    # Cores each role kept busy over the whole session (warm-up included): CPU s ÷ wall s.
    cores_busy: dict[str, float]
    execution_providers: str
    levels: dict[str, float]

    def over(self, base: ScalePoint) -> float:
        return self.requests_per_s / base.requests_per_s if base.requests_per_s else 0.0


def tiny_repository(out: Path) -> Path:
    """A repository holding only the bench's tiny model: servers start fast."""
    from inferd.demo_models import write_model
    from inferd.loadtest.bench.repository import TINY_CONFIG, build_tiny

    write_model(build_tiny(), out, "tiny", config_toml=TINY_CONFIG)
    return out


def scale_point(
    repository: Path,
    workdir: Path,
    workers: int,
    model: str,
    levels: Sequence[LoadLevel],
    plan: MeasurementPlan,
    harness_workers: int,
    connections: int,
    env: Mapping[str, str],
    out: Path | None,
    progress: bool,
) -> ScalePoint:
    extra = ["--workers", str(workers)] if workers > 1 else []
    server = start_inferd(repository, workdir / f"scale-{workers}.log", env=env, extra_args=extra)
    try:
        roles = expect_roles(server, workers) if workers > 1 else {}
        top = "supervisor" if workers > 1 else "server"
        pids = {top: [server.process.pid], **roles}
        before = {role: sum(cpu_s(p) for p in ps) for role, ps in pids.items()}
        began = time.perf_counter()
        spec = _target(server, model, f"workers {workers}", connections)
        session = run_session(
            [spec], levels, plan, Workload(), workers=harness_workers, progress=progress
        )
        wall = time.perf_counter() - began
        after = {role: sum(cpu_s(p) for p in ps) for role, ps in pids.items()}
    finally:
        server.stop()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(session, out / f"workers-{workers}.json")
    (target,) = session.targets
    best = max(target.levels, key=lambda r: r.requests_per_s)
    latency = LatencySummary.of(best.measured.latencies)
    cpu = best.server_cpu_ms_per_request
    return ScalePoint(
        workers=workers,
        level=best.level.label,
        requests_per_s=best.requests_per_s,
        p50_ms=latency.p50_ms,
        p99_ms=latency.p99_ms,
        errors=sum(best.measured.errors.values()),
        cpu_us_per_request=cpu * 1e3 if cpu is not None else None,
        cores_busy={
            "whole server": sum(after[role] - before[role] for role in pids) / wall,
            **{role: (after[role] - before[role]) / wall for role in pids if len(pids) > 1},
        },
        execution_providers=target.description.get("execution_providers", ""),
        levels={r.level.label: r.requests_per_s for r in target.levels},
    )


def scale_table(points: Sequence[ScalePoint]) -> str:
    base = next((p for p in points if p.workers == 1), None)
    rows = []
    for p in points:
        ratio = p.over(base) if base is not None else None
        goal = SCALE_GOAL * p.workers
        met = "-" if ratio is None or p.workers == 1 else ("yes" if ratio >= goal else "NO")
        rows.append(
            [
                str(p.workers),
                p.level,
                fmt(p.requests_per_s, 0),
                fmt(ratio) if ratio is not None else "-",
                f"≥ {goal:.1f}" if p.workers > 1 else "",
                met,
                fmt(p.p50_ms, 3),
                fmt(p.p99_ms, 3),
                _us(p.cpu_us_per_request),
                ", ".join(f"{role} {fmt(v, 1)}" for role, v in p.cores_busy.items()),
                str(p.errors),
            ]
        )
    return markdown_table(
        (
            "--workers",
            "best level",
            "req/s",
            "÷ workers 1",
            "goal",
            "met",
            "p50 ms",
            "p99 ms",
            "server CPU µs/request",
            "cores busy (whole session, start-up included)",
            "errors",
        ),
        rows,
    )


def run_scale(args: argparse.Namespace, counts: Sequence[int], plan: MeasurementPlan) -> int:
    env = dict(item.split("=", 1) for item in args.env)
    levels = closed_levels(args.scale_levels)
    points: list[ScalePoint] = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = tiny_repository(Path(tmp) / "models")
        for n in counts:
            print(f"workers: --workers {n} ...", flush=True)
            points.append(
                scale_point(
                    repository,
                    Path(tmp),
                    n,
                    "tiny",
                    levels,
                    plan,
                    args.harness_workers,
                    args.connections,
                    env,
                    args.out,
                    not args.quiet,
                )
            )
    providers = ", ".join(sorted({p.execution_providers for p in points}))
    text = "\n\n".join(
        [
            "## Workers: throughput of --workers N (tiny model)",
            f"Closed loop at {args.scale_levels} over {args.connections} connections per "
            f"load-generating process ({args.harness_workers} of them), each server started "
            f"alone; the best level of each. Goal: ≥ {SCALE_GOAL:g}·N x one process. "
            f"Execution provider: {providers or 'unknown'}. Machine: "
            f"{describe_machine()['cores']} cores (the load generator shares them).",
            scale_table(points),
        ]
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.md").write_text(text + "\n")
        (args.out / "scale.json").write_text(
            json.dumps(
                {
                    "tool": "inferd.loadtest.bench.workers --scale",
                    "machine": describe_machine(),
                    "goal": SCALE_GOAL,
                    "points": [asdict(p) for p in points],
                },
                indent=1,
            )
            + "\n"
        )
    return 0


# -- command line -----------------------------------------------------------------------------


def _pairs(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inferd.loadtest.bench.workers",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--models", default="tiny,cnn", help="models of the bench repository")
    parser.add_argument("--frontends", type=int, default=2, help="--workers N of the server")
    parser.add_argument("--connections", type=int, default=8, help="HTTP/2 connections")
    parser.add_argument("--concurrency", type=int, default=16, help="callers, CPU part")
    parser.add_argument(
        "--requests", default="tiny=20000,cnn=2000", help="measured requests per model"
    )
    parser.add_argument(
        "--levels", default="tiny=1:8:32,cnn=1:8", help="harness levels; '': CPU part only"
    )
    parser.add_argument("--cores", type=int, default=16, help="the machine projected")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=None, help="s per harness level")
    parser.add_argument("--quick", action="store_true", help="a fifth of it: checks, no figures")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the servers")
    parser.add_argument("--out", type=Path, default=None, help="write workers.json here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    scale = parser.add_argument_group(
        "scaling (the GPU check): throughput of --workers N on the tiny model, one server at a time"
    )
    scale.add_argument("--scale", default="", help="e.g. 1,2,4,8: measure these instead")
    scale.add_argument("--scale-levels", default="32,128", help="closed-loop concurrency")
    scale.add_argument("--harness-workers", type=int, default=2, help="load-generating processes")
    args = parser.parse_args(argv)

    levels = {}
    for item in filter(None, args.levels.split(",")):
        name, _, values = item.partition("=")
        levels[name] = [int(v) for v in values.split(":")]
    plan = QUICK_PLAN if args.quick else DEFAULT_PLAN
    if args.duration is not None:
        plan = MeasurementPlan(
            warmup_s=plan.warmup_s, window_s=min(plan.window_s, args.duration),
            duration_s=args.duration,
        )  # fmt: skip
    if args.scale:
        return run_scale(args, [int(n) for n in args.scale.split(",")], plan)
    requests = _pairs(args.requests)
    if args.quick:
        requests = {k: max(200, v // 5) for k, v in requests.items()}
    options = Options(
        models=tuple(filter(None, args.models.split(","))),
        frontends=args.frontends,
        connections=args.connections,
        cpu_concurrency=args.concurrency,
        cpu_requests=requests,
        levels=levels,
        cores=args.cores,
        rounds=1 if args.quick else max(1, args.rounds),
        plan=plan,
        harness_workers=args.harness_workers,
        env=dict(item.split("=", 1) for item in args.env),
    )

    def run(name: str, targets: Sequence[TargetSpec], levels: Sequence[LoadLevel]) -> SessionReport:
        session = run_session(
            targets,
            levels,
            options.plan,
            Workload(),
            workers=options.harness_workers,
            rounds=options.rounds,
            time_limit_s=900.0,
            progress=not args.quiet,
        )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(session, args.out / f"compare-{name}.json")
        return session

    with tempfile.TemporaryDirectory() as tmp:
        repository = build_bench_repository(Path(tmp) / "models")
        bench = run_benchmark(repository, Path(tmp), options, run)
    print("\n\n".join([_method(options), *tables(bench), *bench.notes]))
    for what, value in headline(bench):
        print(f"{what.strip()}: {value}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "workers.json").write_text(json.dumps(bench.record(), indent=1) + "\n")
        print(f"workers: wrote {args.out / 'workers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
