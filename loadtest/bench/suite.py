"""`make bench` (`python -m inferd.loadtest.bench`): build the bench repository, start inferd
(and the
peers a scenario needs) on free loopback ports, run every scenario, write docs/benchmarks.md.

A scenario that cannot run is reported as pending or failed with the exact reason, and the
others still run. Each scenario is bounded in time; the suite takes about 18 minutes here.
`--only 8` runs some scenarios and replaces just their sections (and summary rows, and
figures) in the existing document.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from inferd.loadtest.bench import PROJECT_ROOT, framework, peers, served
from inferd.loadtest.bench.document import update_document, write_document
from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.bench.scenario import (
    BenchContext,
    Scenario,
    ScenarioPending,
    ScenarioResult,
    load_scenarios,
)
from inferd.loadtest.bench.workers import workers_scenario
from inferd.loadtest.server_process import ServerStartError, start_inferd

RUNNERS: dict[str, Callable[[BenchContext, Scenario], ScenarioResult]] = {
    "batching_gain": served.batching_gain,
    "efficiency": served.efficiency,
    "added_latency": served.added_latency,
    "native_vs_oip": served.native_vs_oip,
    "peak_rate": served.peak_rate,
    "peers": peers.peers,
    "perf_analyzer": peers.perf_analyzer_check,
    "framework_ceiling": framework.framework_ceiling,
    "workers": workers_scenario,
}

KNOWN_GAPS = [
    "The load generator runs on the same two cores as the server it measures, so at high "
    "request rates part of every figure is the generator's own CPU time; the in-process "
    "ceiling and the peers pay the same tax, which is why only ratios are quoted.",
    "Open-loop sends are timed by the asyncio event loop, whose timers fire up to about 1 ms "
    "late; that lateness is counted in the latency (as it should be) and reported apart as "
    "send lag in the JSON reports.",
    "Requests are pre-serialised and responses are not decoded: the harness measures the "
    "server, not a client library's protobuf work.",
    "MLServer reports no server-side statistics over gRPC, so its queue/compute split is empty.",
]


def run_scenario(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    began = time.monotonic()
    try:
        result = RUNNERS[scenario.kind](ctx, scenario)
    except ScenarioPending as exc:
        result = ScenarioResult(scenario, "pending", str(exc))
    except Exception as exc:
        traceback.print_exc()
        result = ScenarioResult(scenario, "failed", f"{type(exc).__name__}: {exc}")
    result.elapsed_s = time.monotonic() - began
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferd.loadtest.bench", description=__doc__)
    parser.add_argument("--only", help="scenario ids to run, e.g. 1,3 (default: all)")
    parser.add_argument("--document", type=Path, default=PROJECT_ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--quick", action="store_true", help="1 s windows: checks the suite, figures not quotable"
    )
    args = parser.parse_args(argv)

    scenarios = load_scenarios()
    if args.quick:
        scenarios = [
            replace(s, plan=replace(s.plan, warmup_s=0.5, window_s=1.0, max_windows=3), rounds=1)
            for s in scenarios
        ]
    if args.only:
        wanted = {int(v) for v in args.only.split(",")}
        scenarios = [s for s in scenarios if s.id in wanted]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = PROJECT_ROOT / ".bench" / "run"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    document: Path = args.document.resolve()
    figures = document.parent / "benchmarks"
    partial = bool(args.only) and document.is_file()
    if partial:
        for scenario in scenarios:
            for stale in figures.glob(f"s{scenario.id}-*"):
                shutil.rmtree(stale, ignore_errors=True)
    else:
        # Every scenario's figures go; the folders of sections kept by hand (overload/,
        # workers/: their own tools' runs, see document.py) stay with their sections.
        for stale in figures.glob("s[0-9]*-*"):
            shutil.rmtree(stale, ignore_errors=True)
    repository = build_bench_repository(workdir / "repository")
    inferd_log = workdir / "inferd.log"
    began = time.monotonic()
    try:
        inferd = start_inferd(repository, inferd_log, metrics=False)
    except ServerStartError as exc:
        print(f"bench: inferd did not start: {exc}", file=sys.stderr)
        return 1
    ctx = BenchContext(
        repository=repository,
        workdir=workdir,
        figures=figures,
        results=PROJECT_ROOT / "loadtest" / "results" / f"bench-{stamp}",
        inferd=inferd,
        document=document,
        progress=not args.quiet,
    )
    results: list[ScenarioResult] = []
    try:
        for scenario in scenarios:
            print(f"bench: {scenario.id}. {scenario.title} ...", flush=True)
            result = run_scenario(ctx, scenario)
            results.append(result)
            print(
                f"bench: {scenario.id}. {result.status} in {result.elapsed_s:.0f} s"
                + (f": {result.reason}" if result.reason else ""),
                flush=True,
            )
            for what, value in result.headline:
                print(f"    {what.strip()}: {value}", flush=True)
            if inferd.process.poll() is not None:
                print(f"bench: inferd exited; log tail:\n{inferd.log_tail()}", file=sys.stderr)
                inferd = ctx.inferd = start_inferd(repository, inferd_log, metrics=False)
    finally:
        ctx.inferd.stop()
    command = "make bench"
    if args.only:
        command = f"python -m inferd.loadtest.bench --only {args.only}" + (
            " --quick" if args.quick else ""
        )
    if partial:
        update_document(document, results, command)
    else:
        plan = scenarios[0].plan if scenarios else load_scenarios()[0].plan
        workers = scenarios[0].workers if scenarios else 2
        write_document(
            document, results, plan, workers, time.monotonic() - began, command, KNOWN_GAPS
        )
    print(f"bench: wrote {document} (reports in {ctx.results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
