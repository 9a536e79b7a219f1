"""docs/benchmarks.md: machine and versions, method, the ratios, then every scenario, and the
client's cost (written by `python -m inferd.loadtest.bench.client`, kept when the suite runs).

`make bench` writes the whole document; a run of some scenarios (`--only`) and the client
benchmark replace only their own sections (and summary rows) in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from inferd.loadtest.bench.costs import ClientBenchmark, CostRatio, ServerCost
from inferd.loadtest.bench.scenario import (
    BenchContext,
    Scenario,
    ScenarioResult,
    figure_links,
    fmt,
    markdown_table,
)
from inferd.loadtest.bench.sections import (
    find_section,
    put_scenario_rows,
    put_section,
    split_sections,
)
from inferd.loadtest.environment import describe_machine
from inferd.loadtest.runner import MeasurementPlan

REPRODUCE_HEADING = "## Reproduce, or measure something else"
SUMMARY_HEADING = "## The ratios"
CLIENT_HEADING = "## Client cost"
# Measured by hand with the commands it names (the request path's stages and A/B runs).
PATH_HEADING = "## Per-request path"
OVERLOAD_HEADING = "## Overload"
IPC_HEADING = "## Between processes"
# `inferd serve --workers N`: figures from `python -m inferd.loadtest.bench.workers`, read.
WORKERS_HEADING = "## Workers"
GPU_HEADING = "## GPU"
# A section not in the document goes before the first of these (after the scenarios).
BEFORE = (CLIENT_HEADING, REPRODUCE_HEADING)

REPRODUCE = """\
`make bench` runs this whole suite. The harness on its own, against any server on this machine:

```
.venv/bin/inferd-loadtest --target native:127.0.0.1:8001 --model mlp --concurrency 1,4,16,64
.venv/bin/inferd-loadtest --target oip:127.0.0.1:8001 --model mlp --rate 200,800 --arrival poisson
.venv/bin/inferd-loadtest --model text_encoder --shape input_ids=1,16 --shape attention_mask=1,16 \\
    --concurrency 1 --compare native:127.0.0.1:8001 inprocess:models
.venv/bin/inferd-loadtest --help
.venv/bin/python -m inferd.loadtest.bench --only 8   # one scenario; replaces only its section
.venv/bin/python -m inferd.loadtest.bench.client     # the client's cost per call (its section)
.venv/bin/python -m inferd.loadtest.bench.workers --out DIR  # --workers N: CPU per process
make profile                                         # py-spy flame graph: docs/profiles/
```

Each run writes report.json, report.csv, latency_throughput.png and latency_cdf.png under
`loadtest/results/<time>/` (or `--out`)."""

STATUS = {"measured": "measured", "pending": "pending", "failed": "failed"}


def _machine_table(machine: dict[str, object]) -> str:
    packages = machine.get("packages", {})
    assert isinstance(packages, dict)
    rows = [
        ["CPU", f"{machine['cpu']}, {machine['cores']} cores (shared with other work)"],
        ["memory", f"{machine['memory_gib']} GiB"],
        ["OS", str(machine["os"])],
        ["Python", str(machine["python"])],
        *([name, str(version)] for name, version in sorted(packages.items())),
        ["inferd revision", f"`{machine['revision']}`"],
    ]
    return markdown_table(("", ""), rows)


def _method(plan: MeasurementPlan, workers: int) -> str:
    return "\n".join(
        [
            f"- Load comes from `inferd-loadtest`: up to {workers} worker processes (a level uses "
            "one per 16 callers or 1,000 requests/s), each an asyncio event loop with grpc.aio "
            "clients sending pre-serialised requests; the server and the load generator share "
            "this machine's cores.",
            f"- Each load level: {plan.warmup_s:g} s warm-up, then windows of {plan.window_s:g} s "
            f"until the last three agree within {plan.tolerance:.0%} on throughput and median "
            f"latency, or {plan.max_windows} windows at most (then marked `*`). The figures are "
            "those last three windows merged: percentiles are exact (nearest rank over every "
            "request's latency, no histogram).",
            "- Closed loop: `c=N` callers, each with one request outstanding. Open loop: Poisson "
            "arrivals at a set rate, latency counted from each request's intended send time, "
            "so a stall shows in every request it delayed (no coordinated omission).",
            "- The server-side split (queue, compute, mean executed batch) is read from the "
            "server's own counters (inferd: ModelStatus.GetModelStatus; Triton: "
            "ModelStatistics) at the window boundaries; MLServer keeps none.",
            "- This is a shared, noisy 2-core machine: absolute figures move from run to run. "
            "Only ratios measured side by side in one run (targets interleaved level by level) "
            "are quoted; read absolute numbers as this machine's, not inferd's.",
        ]
    )


def _summary(results: Sequence[ScenarioResult]) -> str:
    rows: list[list[str]] = []
    for result in results:
        scenario = result.scenario
        name = f"{scenario.id}. {scenario.title}"
        if result.status != "measured":
            rows.append([name, STATUS[result.status], result.reason.splitlines()[0]])
            continue
        for what, value in result.headline:
            rows.append([name, what.strip(), value])
            name = ""
    return markdown_table(("scenario", "figure", "value"), rows)


def _section(result: ScenarioResult) -> str:
    scenario = result.scenario
    parts = [f"## {scenario.id}. {scenario.title}"]
    if scenario.question:
        parts.append(f"*{scenario.question}*")
    if result.status != "measured":
        parts.append(f"**{STATUS[result.status].capitalize()}:** {result.reason}")
        return "\n\n".join(parts)
    parts.extend(result.body)
    parts.append(f"({result.elapsed_s:.0f} s)")
    return "\n\n".join(parts)


def write_document(
    path: Path,
    results: Sequence[ScenarioResult],
    plan: MeasurementPlan,
    workers: int,
    elapsed_s: float,
    command: str,
    gaps: Sequence[str],
) -> None:
    machine = describe_machine()
    written = _now()
    previous = path.read_text() if path.exists() else ""
    # The client's section comes from its own benchmark, not from this suite: keep it.
    client = find_section(split_sections(previous), CLIENT_HEADING)
    kept_by_hand = [client.rstrip("\n")] if client else []
    for heading in (PATH_HEADING, OVERLOAD_HEADING, IPC_HEADING, WORKERS_HEADING):
        # Written from their own tools' runs (scripts/request_stages.py, bench.overload,
        # scripts/measure_ipc.py, bench.workers).
        kept = find_section(split_sections(previous), heading)
        kept_by_hand += [kept.rstrip("\n")] if kept else []
    text = "\n\n".join(
        [
            "# Benchmarks",
            f"Written by `{command}` on {written} ({elapsed_s / 60:.1f} min). The scenarios are "
            "the files in `loadtest/scenarios/`; each run's JSON reports are kept under "
            "`loadtest/results/` and its plots under `docs/benchmarks/`.",
            "## Machine and versions",
            _machine_table(machine),
            "## Method",
            _method(plan, workers),
            SUMMARY_HEADING,
            _summary(results),
            *(_section(r) for r in results),
            *kept_by_hand,
            REPRODUCE_HEADING,
            REPRODUCE,
            "## Known gaps",
            "\n".join(f"- {gap}" for gap in gaps),
        ]
    )
    # The GPU section comes from scripts/gpu_check.sh on the device, not from this suite: keep it.
    gpu = previous.find(f"\n{GPU_HEADING}\n")
    if gpu >= 0:
        text += "\n" + previous[gpu:].rstrip("\n")
    path.write_text(text + "\n")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def update_document(path: Path, results: Sequence[ScenarioResult], command: str) -> None:
    """Replace the sections and summary rows of `results` in the document at `path`; every
    other section stays as the run named in its header wrote it."""
    parts = split_sections(path.read_text())
    for result in results:
        section = (
            _section(result)
            + f"\n\nThis section alone was written by `{command}` on {_now()}; the others come "
            "from the run named at the top."
        )
        heading = f"## {result.scenario.id}. {result.scenario.title}"
        put_section(parts, section, heading, result.scenario.id, BEFORE)
        rows = _summary([result]).split("\n")[2:]
        put_scenario_rows(parts, SUMMARY_HEADING, result.scenario.id, rows)
    path.write_text("".join(parts).rstrip("\n") + "\n")


def write_section(path: Path, heading: str, section: str) -> None:
    """Put `section` (starting with `heading`) into the document at `path`, in place of the
    section with that heading, or before the reproduce section; a new file holds just it."""
    text = path.read_text() if path.exists() else ""
    parts = split_sections(text)
    put_section(parts, section, heading, None, BEFORE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts).rstrip("\n") + "\n")


# -- scenario 8, the framework ceiling -------------------------------------------------------


def _us(value: float | None) -> str:
    return fmt(value, 0) if value is not None else "n/a"


def framework_ceiling_tables(
    costs: Sequence[ServerCost],
    versus_ceiling: Sequence[CostRatio],
    versus_triton: Sequence[CostRatio],
) -> list[str]:
    """The per-server table and the ratio table (markdown)."""
    figures = markdown_table(
        ("server", "protocol", "level", "req/s", "p50 ms", "p99 ms", "server CPU µs/request"),
        [
            [
                c.label,
                c.protocol,
                c.level
                + ("" if c.stable else " *")
                + (f" ({c.errors} errors)" if c.errors else ""),
                fmt(c.requests_per_s, 0),
                fmt(c.p50_ms, 3),
                fmt(c.p99_ms, 3),
                _us(c.cpu_us_per_request),
            ]
            for c in costs
        ],
    )
    triton = {(r.protocol, r.level): r for r in versus_triton}
    rows = []
    for r in versus_ceiling:
        t = triton.get((r.protocol, r.level))
        rows.append(
            [
                r.protocol,
                r.level,
                fmt(r.requests_per_s),
                fmt(r.p50),
                fmt(r.p99),
                fmt(r.cpu_per_request),
                fmt(t.requests_per_s) if t else "-",
                fmt(t.p50) if t else "-",
                fmt(t.cpu_per_request) if t else "-",
            ]
        )
    ratios = markdown_table(
        (
            "protocol",
            "level",
            "inferd ÷ ceiling req/s",
            "p50",
            "p99",
            "CPU/request",
            "inferd ÷ Triton req/s",
            "p50",
            "CPU/request",
        ),
        rows,
    )
    return [figures, ratios]


def framework_ceiling_body(
    ctx: BenchContext,
    scenario: Scenario,
    model: str,
    costs: Sequence[ServerCost],
    versus_ceiling: Sequence[CostRatio],
    versus_triton: Sequence[CostRatio],
    notes: Sequence[str],
) -> list[str]:
    plan = scenario.plan
    levels = ", ".join(dict.fromkeys(c.level for c in costs))
    length = (
        f"{plan.duration_s:g} s measured" if plan.duration_s else f"windows of {plan.window_s:g} s"
    )
    if scenario.rounds > 1:
        length += f", {scenario.rounds} rounds merged"
    return [
        f"The framework ceiling (`loadtest/bench/ceiling.py`) is a grpc.aio server with no "
        "inference: the same Python, grpc and default asyncio event loop as inferd, inferd's "
        "server options, the generated servicers; per request gRPC parses the message, the "
        "handler reads each input's bytes once and returns a reply stored per input shape (the "
        "model's outputs, zero-filled). It, inferd and Triton (OIP only) serve the same "
        f"`{model}` model, driven by the same harness, closed loop at {levels}, one row per "
        f"request, targets interleaved level by level ({plan.warmup_s:g} s warm-up, {length}). "
        "Server CPU is the server process's user + system time (its descendants included: "
        "Triton's Python-backend stub) over the measured window, from /proc/PID/stat, divided "
        "by the requests answered in it. The load generator shares this machine's two cores, "
        "so a server that needs less CPU also leaves more to its load.",
        *framework_ceiling_tables(costs, versus_ceiling, versus_triton),
        "inferd ÷ ceiling below 1 in req/s (above 1 in CPU/request) is what inferd's own request "
        "path costs beyond parsing and answering; the ceiling bounds what any change to that "
        "path can win on this stack.",
        *notes,
        figure_links(ctx, scenario, model),
    ]


# -- the client's cost -----------------------------------------------------------------------


def client_cost_section(bench: ClientBenchmark, command: str) -> str:
    rows = [
        [
            c.api,
            f"`{c.caller}`",
            fmt(c.mean_us, 1),
            fmt(c.cpu_us, 1),
            " / ".join(fmt(b, 0) for b in c.block_us),
        ]
        for c in bench.costs
    ]
    ratios = []
    for client, raw in bench.pairs():
        ratio = client.mean_us / raw.mean_us
        ratios.append(
            [
                client.api,
                fmt(ratio),
                fmt(client.mean_us - raw.mean_us, 1),
                fmt(client.cpu_us / raw.cpu_us),
                fmt(client.cpu_us - raw.cpu_us, 1),
                "yes" if ratio <= bench.target_ratio else "NO",
            ]
        )
    return "\n\n".join(
        [
            CLIENT_HEADING,
            "*What does `inferd_client` add to a call, against a raw generated stub call with a "
            "pre-built request?*",
            f"Written by `{command}` on {_now()}. One inferd serving `{bench.model}` "
            f"(input shape {list(bench.input_shape)}), one caller, calls one after another (c=1): "
            f"`InferClient.infer` (numpy in, numpy out) against "
            "`predict_pb2_grpc.PredictStub(channel).Predict(request)` with the request built "
            "once, and the same for `AsyncInferClient` against the grpc.aio stub. The two "
            f"alternate in {bench.blocks} blocks of {bench.calls_per_block:,} calls each (after "
            f"{bench.warmup:,} warm-up calls each); time is wall-clock per call, CPU is this "
            "process's `time.process_time()` per call (all its threads, gRPC's included). "
            "The server runs on the same two cores, so its time is in both columns alike.",
            markdown_table(
                ("API", "call", "mean µs/call", "client CPU µs/call", "µs/call per block"), rows
            ),
            markdown_table(
                (
                    "API",
                    "client ÷ raw, time",
                    "client - raw, µs",
                    "client ÷ raw, CPU",
                    "client - raw, CPU µs",
                    f"time ratio ≤ {bench.target_ratio:g}",
                ),
                ratios,
            ),
        ]
    )
