"""docs/benchmarks.md: machine and versions, method, the ratios, then every scenario."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from inferd.loadtest.bench.scenario import ScenarioResult, markdown_table
from inferd.loadtest.environment import describe_machine
from inferd.loadtest.runner import MeasurementPlan

REPRODUCE = """\
`make bench` runs this whole suite. The harness on its own, against any server on this machine:

```
.venv/bin/inferd-loadtest --target native:127.0.0.1:8001 --model mlp --concurrency 1,4,16,64
.venv/bin/inferd-loadtest --target oip:127.0.0.1:8001 --model mlp --rate 200,800 --arrival poisson
.venv/bin/inferd-loadtest --model text_encoder --shape input_ids=1,16 --shape attention_mask=1,16 \\
    --concurrency 1 --compare native:127.0.0.1:8001 inprocess:models
.venv/bin/inferd-loadtest --help
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
    written = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
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
            "## The ratios",
            _summary(results),
            *(_section(r) for r in results),
            "## Reproduce, or measure something else",
            REPRODUCE,
            "## Known gaps",
            "\n".join(f"- {gap}" for gap in gaps),
        ]
    )
    # The GPU section comes from scripts/gpu_check.sh on the device, not from this suite: keep it.
    previous = path.read_text() if path.exists() else ""
    gpu = previous.find("\n## GPU\n")
    if gpu >= 0:
        text += "\n" + previous[gpu:].rstrip("\n")
    path.write_text(text + "\n")
