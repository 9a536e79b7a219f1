"""Reports of a session: the table printed at the end, JSON, CSV, and the ratios of every target
against the first (the only way figures are quoted on a shared machine)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inferd.loadtest.latency import LatencySummary, percentiles
from inferd.loadtest.runner import LevelResult
from inferd.loadtest.session import SessionReport, TargetReport


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def level_record(target: TargetReport, result: LevelResult) -> dict[str, Any]:
    measured = result.measured
    record: dict[str, Any] = {
        "target": target.spec.name,
        "level": result.level.label,
        **result.level.as_dict(),
        "client_batch": result.client_batch,
        "stable": result.stable,
        "stop_reason": result.stop_reason,
        "rounds": result.rounds,
        "windows": len(result.windows),
        "window_requests_per_s": [round(w.requests_per_s, 1) for w in result.windows],
        "measured_s": measured.duration,
        "requests": int(measured.latencies.size),
        "requests_per_s": result.requests_per_s,
        "rows_per_s": result.rows_per_s,
        "latency_ms": LatencySummary.of(measured.latencies).as_dict(),
        "errors": dict(sorted(measured.errors.items())),
        "error_count": sum(measured.errors.values()),
        "cancelled_at_stop": result.cancelled,
        "server": result.server.as_dict() if result.server is not None else None,
        "server_cpu_s": result.server_cpu_s,
        "server_cpu_ms_per_request": result.server_cpu_ms_per_request,
    }
    if result.level.mode == "open":
        lags = measured.send_lags
        p50, p99 = percentiles(lags, (50.0, 99.0))
        record["send_lag_ms"] = {
            "p50": p50 * 1e3,
            "p99": p99 * 1e3,
            "max": float(lags.max()) * 1e3 if lags.size else float("nan"),
        }
    return record


def ratios(session: SessionReport) -> list[dict[str, Any]]:
    """For each level and each target after the first: its figures ÷ the first target's."""
    if len(session.targets) < 2:
        return []
    base = session.targets[0]
    out: list[dict[str, Any]] = []
    for other in session.targets[1:]:
        for mine, theirs in zip(base.levels, other.levels, strict=False):
            a = LatencySummary.of(mine.measured.latencies)
            b = LatencySummary.of(theirs.measured.latencies)
            out.append(
                {
                    "level": mine.level.label,
                    "target": other.spec.name,
                    "baseline": base.spec.name,
                    "requests_per_s": _ratio(theirs.requests_per_s, mine.requests_per_s),
                    "rows_per_s": _ratio(theirs.rows_per_s, mine.rows_per_s),
                    "p50": _ratio(b.p50_ms, a.p50_ms),
                    "p99": _ratio(b.p99_ms, a.p99_ms),
                }
            )
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) else float("nan")


def session_record(session: SessionReport) -> dict[str, Any]:
    record: dict[str, Any] = _finite(
        {
            "tool": "inferd-loadtest",
            "started": session.started,
            "elapsed_s": session.elapsed_s,
            "machine": session.machine,
            "plan": asdict(session.plan),
            "rounds": session.rounds,
            "notes": session.notes,
            "targets": [
                {
                    "name": t.spec.name,
                    "kind": t.spec.kind,
                    "where": t.spec.where,
                    "model": t.spec.model,
                    "client_batch": t.client_batch,
                    "rows_per_request": t.rows_per_request,
                    "workers": t.workers,
                    "description": t.description,
                    "levels": [level_record(t, r) for r in t.levels],
                }
                for t in session.targets
            ],
            "ratios": ratios(session),
        }
    )
    return record


def write_json(session: SessionReport, path: Path) -> None:
    path.write_text(json.dumps(session_record(session), indent=2) + "\n")


CSV_COLUMNS = (
    "target", "level", "mode", "concurrency", "rate", "arrival", "client_batch", "stable",
    "requests", "requests_per_s", "rows_per_s", "mean_ms", "p50_ms", "p90_ms", "p95_ms",
    "p99_ms", "p999_ms", "max_ms", "error_count", "server_mean_queue_ms",
    "server_mean_compute_ms", "server_mean_batch_size",
)  # fmt: skip


def write_csv(session: SessionReport, path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for target in session.targets:
            for result in target.levels:
                record = level_record(target, result)
                server = record["server"] or {}
                row = {
                    **record,
                    **record["latency_ms"],
                    "server_mean_queue_ms": server.get("mean_queue_ms"),
                    "server_mean_compute_ms": server.get("mean_compute_ms"),
                    "server_mean_batch_size": server.get("mean_batch_size"),
                }
                writer.writerow(_finite(row))


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


TABLE_HEADER = (
    "target", "level", "req/s", "rows/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
    "errors", "queue ms", "compute ms", "batch",
)  # fmt: skip


def table_rows(session: SessionReport) -> list[list[str]]:
    rows: list[list[str]] = []
    for target in session.targets:
        for result in target.levels:
            latency = LatencySummary.of(result.measured.latencies)
            server = result.server
            errors = sum(result.measured.errors.values())
            rows.append(
                [
                    target.spec.name,
                    result.level.label + ("" if result.stable else " *"),
                    _fmt(result.requests_per_s, 0),
                    _fmt(result.rows_per_s, 0),
                    _fmt(latency.p50_ms, 3),
                    _fmt(latency.p90_ms, 3),
                    _fmt(latency.p99_ms, 3),
                    _fmt(latency.p999_ms, 3),
                    _fmt(latency.max_ms, 3),
                    str(errors) if not errors else f"{errors} ({_top_error(result)})",
                    _fmt(server.mean_queue_ms if server else None, 3),
                    _fmt(server.mean_compute_ms if server else None, 3),
                    _fmt(server.mean_batch_size if server else None, 2),
                ]
            )
    return rows


def _top_error(result: LevelResult) -> str:
    code, _ = result.measured.errors.most_common(1)[0]
    return code


def format_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def format_session(session: SessionReport) -> str:
    parts = [format_table(TABLE_HEADER, table_rows(session))]
    if any(not r.stable for t in session.targets for r in t.levels):
        parts.append("* not stable: its windows did not agree within the tolerance")
    compared = ratios(session)
    if compared:
        header = ("level", "target ÷ baseline", "req/s", "rows/s", "p50", "p99")
        rows = [
            [
                r["level"],
                f"{r['target']} ÷ {r['baseline']}",
                _fmt(r["requests_per_s"]),
                _fmt(r["rows_per_s"]),
                _fmt(r["p50"]),
                _fmt(r["p99"]),
            ]
            for r in compared
        ]
        parts.append("Ratios against the first target (measured interleaved):")
        parts.append(format_table(header, rows))
    parts.extend(session.notes)
    return "\n\n".join(parts)
