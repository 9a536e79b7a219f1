"""What a benchmark scenario is (a TOML file under loadtest/scenarios/), what it is given to
run, what it hands back, and the one way every scenario measures: an interleaved session whose
JSON and plots are kept beside the document."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inferd.loadtest.latency import LatencySummary
from inferd.loadtest.levels import LoadLevel
from inferd.loadtest.plots import write_plots
from inferd.loadtest.report import ratios, table_rows, write_json
from inferd.loadtest.runner import MeasurementPlan
from inferd.loadtest.server_process import InferdProcess
from inferd.loadtest.session import SessionReport, Workload, run_session
from inferd.loadtest.targets.target import TargetSpec

SCENARIO_DIR = Path(__file__).resolve().parents[1] / "scenarios"

# Short levels: the whole suite must stay well under 30 minutes on a 2-core machine.
DEFAULT_PLAN = {"warmup_s": 2.0, "window_s": 4.0, "max_windows": 5, "tolerance": 0.10}


@dataclass(frozen=True)
class Scenario:
    id: int
    title: str
    kind: str
    question: str
    params: dict[str, Any]
    plan: MeasurementPlan
    workers: int
    rounds: int

    @classmethod
    def load(cls, path: Path) -> Scenario:
        raw = tomllib.loads(path.read_text())
        plan = {**DEFAULT_PLAN, **raw.pop("plan", {})}
        return cls(
            id=int(raw.pop("id")),
            title=str(raw.pop("title")),
            kind=str(raw.pop("kind")),
            question=str(raw.pop("question", "")),
            workers=int(raw.pop("workers", 2)),
            rounds=int(raw.pop("rounds", 1)),
            plan=MeasurementPlan(**plan),
            params=raw,
        )


def load_scenarios(directory: Path = SCENARIO_DIR) -> list[Scenario]:
    return sorted((Scenario.load(p) for p in directory.glob("*.toml")), key=lambda s: s.id)


@dataclass
class BenchContext:
    repository: Path
    workdir: Path
    # Where plots (for the document) and JSON reports go.
    figures: Path
    results: Path
    inferd: InferdProcess
    # The document being written (figure links are relative to it).
    document: Path
    progress: bool = True


@dataclass
class ScenarioResult:
    scenario: Scenario
    status: Literal["measured", "pending", "failed"] = "measured"
    reason: str = ""
    # (what, value) pairs quoted in the document's summary.
    headline: list[tuple[str, str]] = field(default_factory=list)
    # Markdown blocks, in order.
    body: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


class ScenarioPending(Exception):
    """The scenario cannot run yet; the message says what it waits for."""


def measure(
    ctx: BenchContext,
    scenario: Scenario,
    name: str,
    targets: Sequence[TargetSpec],
    levels: Sequence[LoadLevel],
    workload: Workload | None = None,
    rounds: int | None = None,
) -> SessionReport:
    """One interleaved session; its JSON and plots are written as `s<id>-<name>.*`."""
    session = run_session(
        targets,
        levels,
        scenario.plan,
        workload or Workload(),
        workers=scenario.workers,
        rounds=rounds or scenario.rounds,
        time_limit_s=900.0,
        progress=ctx.progress,
    )
    stem = f"s{scenario.id}-{name}"
    ctx.results.mkdir(parents=True, exist_ok=True)
    write_json(session, ctx.results / f"{stem}.json")
    directory = ctx.figures / stem
    write_plots(session, directory, title=f"{scenario.id}. {scenario.title}: {name}")
    return session


def figure_links(ctx: BenchContext, scenario: Scenario, name: str) -> str:
    """Markdown images of a session's plots, relative to the document."""
    directory = Path(os.path.relpath(ctx.figures / f"s{scenario.id}-{name}", ctx.document.parent))
    return (
        f"![latency against throughput]({directory.as_posix()}/latency_throughput.png)\n"
        f"![latency CDF per level]({directory.as_posix()}/latency_cdf.png)"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


LEVEL_HEADER = (
    "target", "level", "req/s", "rows/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
    "errors", "server queue ms", "server compute ms", "mean batch",
)  # fmt: skip


def session_tables(session: SessionReport) -> str:
    """The level table and, with several targets, the ratio table (markdown)."""
    rows = [[c.replace("|", "/") for c in row] for row in table_rows(session)]
    parts = [markdown_table(LEVEL_HEADER, rows)]
    if any(not r.stable for t in session.targets for r in t.levels):
        parts.append(
            "`*` not stable: the last three windows did not agree within "
            f"{session.plan.tolerance:.0%}; the figures are those three windows all the same."
        )
    compared = ratios(session)
    if compared:
        parts.append(
            markdown_table(
                ("level", "target ÷ baseline", "req/s", "rows/s", "p50", "p99"),
                [
                    [
                        r["level"],
                        f"{r['target']} ÷ {r['baseline']}",
                        fmt(r["requests_per_s"]),
                        fmt(r["rows_per_s"]),
                        fmt(r["p50"]),
                        fmt(r["p99"]),
                    ]
                    for r in compared
                ],
            )
        )
    parts.extend(f"Note: {n}" for n in session.notes)
    return "\n\n".join(parts)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def p50_ms(session: SessionReport, target: int, level: int = 0) -> float:
    return LatencySummary.of(session.targets[target].levels[level].measured.latencies).p50_ms


def p99_ms(session: SessionReport, target: int, level: int = 0) -> float:
    return LatencySummary.of(session.targets[target].levels[level].measured.latencies).p99_ms
