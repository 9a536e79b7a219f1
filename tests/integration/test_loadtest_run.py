"""A short, real load test: `python -m inferd.loadtest` (run outside the checkout, so the
installed harness is what runs) against an inferd server subprocess on the demo models, closed
and open loop, produces a complete report with no errors, and its server-side split matches
what the server counted."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from integration_support import ServerProcess

from inferd.loadtest.targets.oip import stubs_present

# Each level: 0.5 s warm-up, then exactly 1.5 s measured (3 windows of 0.5 s).
FAST = ["--warmup", "0.5", "--window", "0.5", "--duration", "1.5", "--quiet", "--workers", "2"]
RUN_TIMEOUT = 120


def run_loadtest(args: list[str], out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "inferd.loadtest", *args, *FAST, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        cwd=out,
        check=False,
    )
    assert done.returncode == 0, f"loadtest failed:\n{done.stdout}\n{done.stderr}"
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def assert_complete(level: dict[str, Any], client_batch: int) -> None:
    assert level["error_count"] == 0, level["errors"]
    assert level["requests"] > 0
    assert level["measured_s"] == pytest.approx(1.5)
    assert level["requests_per_s"] == pytest.approx(level["requests"] / 1.5)
    assert level["rows_per_s"] == pytest.approx(level["requests_per_s"] * client_batch)
    latency = level["latency_ms"]
    assert latency["count"] == level["requests"]
    ordered = [latency[k] for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "p999_ms", "max_ms")]
    assert all(v is not None and v > 0 for v in ordered)
    assert ordered == sorted(ordered)


def test_closed_and_open_loop_against_inferd_give_a_complete_report(
    server: ServerProcess, tmp_path: Path
) -> None:
    report = run_loadtest(
        [
            "--target", f"native:{server.target}", "--model", "mlp", "--client-batch", "2",
            "--concurrency", "4", "--rate", "150", "--arrival", "poisson",
        ],
        tmp_path,
    )  # fmt: skip
    (target,) = report["targets"]
    assert target["rows_per_request"] == 2
    assert target["description"]["protocol"] == "inferd.v1"
    closed, opened = target["levels"]
    assert (closed["mode"], closed["concurrency"]) == ("closed", 4)
    assert (opened["mode"], opened["rate"], opened["arrival"]) == ("open", 150.0, "poisson")
    for level in (closed, opened):
        assert_complete(level, client_batch=2)
        server_side = level["server"]
        assert server_side is not None
        # The server counted (about) what the harness measured: its counters are read at the
        # window boundaries, the harness assigns requests by completion time.
        assert server_side["requests"] == pytest.approx(level["requests"], rel=0.2, abs=10)
        assert server_side["rows"] == 2 * server_side["requests"]
        assert server_side["mean_batch_size"] >= 2.0
        assert server_side["mean_queue_ms"] >= 0.0
        assert server_side["mean_compute_ms"] > 0.0
    # Open loop: the offered rate is what was achieved, and send lag is reported.
    assert opened["requests_per_s"] == pytest.approx(150.0, rel=0.35)
    assert opened["send_lag_ms"]["p50"] is not None

    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["level"] for r in rows] == ["c=4", "150/s poisson"]
    for name in ("latency_throughput.png", "latency_cdf.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_prints_ratios_against_the_first_target(
    server: ServerProcess, demo_repository: Path, tmp_path: Path
) -> None:
    targets = [f"native:{server.target}", f"inprocess:{demo_repository},threads=1"]
    if stubs_present():
        targets.insert(1, f"oip:{server.target}")
    report = run_loadtest(["--model", "mlp", "--concurrency", "2", "--compare", *targets], tmp_path)
    names = [t["name"] for t in report["targets"]]
    assert names[0] == "native/mlp" and names[-1] == "inprocess/mlp"
    for target in report["targets"]:
        (level,) = target["levels"]
        assert_complete(level, client_batch=1)
    ratios = report["ratios"]
    assert [r["target"] for r in ratios] == names[1:]
    assert all(r["baseline"] == "native/mlp" and r["requests_per_s"] > 0 for r in ratios)
    # The in-process ceiling has no server and no server-side split.
    assert report["targets"][-1]["levels"][0]["server"] is None


def test_non_loopback_targets_are_refused_before_any_load(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferd.loadtest",
            "--target",
            "native:10.1.2.3:8001",
            "--model",
            "mlp",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2
    assert "loopback" in done.stderr
