"""Scenarios 6-7: inferd beside its peers (Triton, MLServer) on the same ONNX file through the
same harness, and the harness checked against Triton's perf_analyzer on the same target."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

from inferd.loadtest.bench import PROJECT_ROOT
from inferd.loadtest.bench.mlserver import MLSERVER, start_mlserver
from inferd.loadtest.bench.repository import batching_of, model_file
from inferd.loadtest.bench.scenario import (
    BenchContext,
    Scenario,
    ScenarioPending,
    ScenarioResult,
    figure_links,
    fmt,
    markdown_table,
    measure,
    p50_ms,
    p99_ms,
    session_tables,
)
from inferd.loadtest.bench.triton import PYTRITON, start_triton, triton_version
from inferd.loadtest.bench.venvs import PeerUnavailable
from inferd.loadtest.levels import closed_levels
from inferd.loadtest.server_process import ServerProcess, ServerStartError
from inferd.loadtest.targets.oip import OipDriver, stubs_present
from inferd.loadtest.targets.target import TargetError, TargetSpec

PERF_ANALYZER_SCRIPT = PROJECT_ROOT / "scripts" / "perf_analyzer.py"


def inferd_oip_target(ctx: BenchContext, model: str) -> TargetSpec:
    """inferd through its OIP frontend; ScenarioPending saying why when it cannot be."""
    if not stubs_present():
        raise ScenarioPending(
            "OIP frontend not present: `from inferd_wire.proto.inference import grpc_service_pb2`"
        )
    spec = TargetSpec("oip", ctx.inferd.target, model, label="inferd")
    driver = OipDriver(spec)
    try:
        driver.signature()
    except TargetError as exc:
        raise ScenarioPending(f"inferd's OIP frontend is not serving: {exc}") from None
    finally:
        driver.close()
    return spec


def start_peer(ctx: BenchContext, peer: str, model: str, workers: int) -> ServerProcess:
    file = model_file(ctx.repository, model)
    batching = batching_of(ctx.repository, model)
    if peer == "triton":
        return start_triton(ctx.workdir / "triton", model, file, batching)
    if peer == "mlserver":
        return start_mlserver(ctx.workdir / "mlserver", model, file, batching, workers)
    raise ValueError(f"unknown peer {peer!r}")


def peers(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    names = {"triton": f"triton ({PYTRITON})", "mlserver": f"mlserver ({MLSERVER})"}
    targets = [inferd_oip_target(ctx, model)]
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        for peer in scenario.params["peers"]:
            try:
                server = start_peer(
                    ctx, peer, model, int(scenario.params.get("mlserver_parallel_workers", 0))
                )
            except (PeerUnavailable, ServerStartError, OSError, subprocess.SubprocessError) as exc:
                notes.append(f"**{names[peer]} could not run**: {exc}")
                continue
            stack.callback(server.stop)
            label = f"triton {triton_version(server)}" if peer == "triton" else "mlserver 1.7.1"
            targets.append(TargetSpec("oip", server.target, model, label=label))
        session = measure(
            ctx,
            scenario,
            model,
            targets,
            closed_levels(",".join(str(c) for c in scenario.params["concurrency"])),
        )
    headline: list[tuple[str, str]] = []
    inferd_levels = session.targets[0].levels
    for peer_report in session.targets[1:]:
        per_level = ", ".join(
            f"{mine.level.label}: {fmt(mine.requests_per_s / theirs.requests_per_s)}"
            for mine, theirs in zip(inferd_levels, peer_report.levels, strict=False)
            if theirs.requests_per_s
        )
        headline.append((f"inferd ÷ {peer_report.spec.name} req/s ({model})", per_level))
    for peer in scenario.params["peers"]:
        if not any(t.spec.name.startswith(peer) for t in session.targets[1:]):
            headline.append((f"inferd ÷ {peer}", "not run (see scenario 6)"))
    batching = batching_of(ctx.repository, model)
    return ScenarioResult(
        scenario,
        headline=headline,
        body=[
            f"Every server serves the same `{model}` ONNX file with the same batching settings "
            f"(max batch {batching.max_batch_size}, queue delay {batching.max_queue_delay_us} "
            "µs, one model instance), on this machine, driven by the same harness over the "
            "Open Inference Protocol (gRPC ModelInfer with raw_input_contents) at the same "
            "concurrencies, interleaved level by level. Triton runs its real `tritonserver` "
            "binary with a Python-backend model.py that makes one onnxruntime call per dynamic "
            "batch (no ONNX Runtime backend is on PyPI). MLServer runs a small onnxruntime "
            "runtime with adaptive batching and `parallel_workers = "
            f"{scenario.params.get('mlserver_parallel_workers', 0)}` (inference in the server "
            "process; its default worker process measured about 2.8x slower here in a trial "
            "at c=8). Each peer has its own virtualenv under `.bench/venvs/` with the same "
            "onnxruntime version as inferd.",
            *notes,
            session_tables(session),
            figure_links(ctx, scenario, model),
        ],
    )


def _perf_analyzer_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("perf_analyzer_setup", PERF_ANALYZER_SCRIPT)
    if spec is None or spec.loader is None:
        raise ScenarioPending(f"{PERF_ANALYZER_SCRIPT} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perf_analyzer_row(path: Path) -> dict[str, float]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ScenarioPending(f"perf_analyzer wrote no rows to {path}")
    return {k.strip(): float(v) for k, v in rows[-1].items() if k and v and _number(v)}


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def perf_analyzer_check(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    concurrency = int(scenario.params["concurrency"])
    tolerance = {k: float(v) for k, v in scenario.params["tolerance"].items()}
    if not PERF_ANALYZER_SCRIPT.is_file():
        raise ScenarioPending(f"{PERF_ANALYZER_SCRIPT.relative_to(PROJECT_ROOT)} not present")
    target = inferd_oip_target(ctx, model)
    script = _perf_analyzer_script()
    try:
        binary, env = script.install()
    except script.InstallError as exc:
        raise ScenarioPending(f"perf_analyzer set-up failed: {exc}") from None
    levels = closed_levels(str(concurrency))
    window_ms = str(int(scenario.plan.window_s * 1000))
    stability = str(int(scenario.params.get("perf_analyzer_stability_percent", 10)))
    trials = str(int(scenario.params.get("perf_analyzer_max_trials", 10)))
    # Alternate the two tools (harness first and last), so drift on this shared machine
    # hurts both alike; each tool's figure is the mean over its runs.
    runs: list[list[str]] = []
    harness_runs: list[tuple[float, float, float]] = []
    pa_runs: list[tuple[float, float, float]] = []
    alternations = int(scenario.params.get("alternations", 2))
    for index in range(alternations + 1):
        session = measure(ctx, scenario, f"{model}-harness{index + 1}", [target], levels)
        level = session.targets[0].levels[0]
        harness_runs.append((level.requests_per_s, p50_ms(session, 0), p99_ms(session, 0)))
        runs.append(["harness", *(fmt(v, 3) for v in harness_runs[-1])])
        if index == alternations:
            break
        out = ctx.results / f"s{scenario.id}-perf_analyzer{index + 1}.csv"
        command = [
            str(binary), "-m", model, "-i", "grpc", "-u", ctx.inferd.target,
            "--concurrency-range", f"{concurrency}:{concurrency}", "-p", window_ms,
            "-s", stability, "--max-trials", trials, "-f", str(out),
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = " ".join((done.stdout + done.stderr).strip().splitlines()[-2:])
            raise RuntimeError(f"perf_analyzer exited with {done.returncode}: {last}")
        pa = _perf_analyzer_row(out)
        pa_runs.append(
            (
                pa.get("Inferences/Second", float("nan")),
                pa.get("p50 latency", float("nan")) / 1e3,
                pa.get("p99 latency", float("nan")) / 1e3,
            )
        )
        runs.append(["perf_analyzer", *(fmt(v, 3) for v in pa_runs[-1])])
    keys = ("throughput", "p50", "p99")
    harness = {k: sum(r[i] for r in harness_runs) / len(harness_runs) for i, k in enumerate(keys)}
    theirs = {k: sum(r[i] for r in pa_runs) / len(pa_runs) for i, k in enumerate(keys)}
    rows = []
    verdicts = []
    for key, unit in (("throughput", "req/s"), ("p50", "ms"), ("p99", "ms")):
        ratio = harness[key] / theirs[key] if theirs[key] else float("nan")
        limit = tolerance.get(key)
        within = limit is not None and abs(ratio - 1) <= limit
        verdicts.append(within if limit is not None else True)
        rows.append(
            [
                f"{key} ({unit})",
                fmt(harness[key], 3),
                fmt(theirs[key], 3),
                fmt(ratio, 3),
                f"±{limit:.0%}" if limit is not None else "reported only",
                ("yes" if within else "NO") if limit is not None else "-",
            ]
        )
    agree = all(verdicts)
    summary = ", ".join(f"{r[0].split()[0]} {r[3]}" for r in rows)
    return ScenarioResult(
        scenario,
        headline=[
            (
                f"harness ÷ perf_analyzer ({model}, c={concurrency})",
                f"{summary}; {'within' if agree else 'OUTSIDE'} tolerance",
            )
        ],
        body=[
            f"perf_analyzer (from tritonclient 2.51.0, set up by scripts/perf_analyzer.py) and "
            f"this harness drive the same inferd OIP target, `{model}`, closed loop "
            f"c={concurrency}, windows of {scenario.plan.window_s:.0f} s, the two tools "
            "alternating (harness first and last); each tool's figure is the mean of its runs. "
            "perf_analyzer's own stopping rule: last 3 windows within "
            f"{stability}% of each other.",
            markdown_table(
                (
                    "figure",
                    "harness",
                    "perf_analyzer",
                    "harness ÷ perf_analyzer",
                    "tolerance",
                    "agree",
                ),
                rows,
            ),
            "Every run, in order:",
            markdown_table(("tool", "req/s", "p50 ms", "p99 ms"), runs),
        ],
    )
