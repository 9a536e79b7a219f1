"""ModelStatistics, read with tritonclient's get_inference_statistics from a server of its own,
counts exactly the requests the test sent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_oip_tritonclient
from integration_support import ServerFactory, ServerProcess
from test_oip_tritonclient import TritonClientProcess, _error, triton_infer, triton_json

from inferd.demo_models import build_mlp, write_model

triton = test_oip_tritonclient.triton


@pytest.fixture
def stats_server(start_server: ServerFactory, tmp_path: Path) -> ServerProcess:
    repo = tmp_path / "repository"
    write_model(build_mlp(), repo, "mlp", config_toml="max_batch_size = 8\n")
    write_model(
        build_mlp(),
        repo,
        "mlp_slow",
        config_toml="max_batch_size = 8\nmax_queue_delay_us = 5000000\n",
    )
    return start_server(repo)


def triton_statistics(target: str, model: str = "", version: str = "") -> Any:
    """get_inference_statistics as JSON, or {"error": (code, message)}."""
    from tritonclient.utils import InferenceServerException

    try:
        return triton_json(target, "get_inference_statistics", model, version)
    except InferenceServerException as exc:
        return {"error": _error(exc)}


def _count(duration: dict[str, str]) -> int:
    return int(duration.get("count", 0))


def _ns(duration: dict[str, str]) -> int:
    return int(duration.get("ns", 0))


def test_statistics_count_the_requests_sent(
    triton: TritonClientProcess, stats_server: ServerProcess
):
    """Requests one after another, so that each is its own batch."""
    rows = [1, 2, 3, 1, 2]
    for n in rows:
        served = triton.run(
            triton_infer, stats_server.target, "mlp", {"input": np.ones((n, 64), np.float32)}
        )
        assert served["probabilities"].shape == (n, 10)
    code, _ = triton.run(
        triton_infer, stats_server.target, "mlp", {"input": np.ones((1, 63), np.float32)}
    )
    assert code == "INVALID_ARGUMENT"  # refused before the model: no execution, no count

    (stats,) = triton.run(triton_statistics, stats_server.target, "mlp")["model_stats"]
    assert stats["name"] == "mlp" and stats["version"] == "1"
    assert int(stats["inference_count"]) == sum(rows)
    assert int(stats["execution_count"]) == len(rows)
    infer = stats["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert _count(infer[key]) == len(rows), key
    assert _count(infer.get("fail", {})) == 0
    assert _ns(infer["success"]) >= _ns(infer["queue"]) + _ns(infer["compute_infer"]) > 0
    by_size = {int(b["batch_size"]): b for b in stats["batch_stats"]}
    assert {size: _count(b["compute_infer"]) for size, b in by_size.items()} == {1: 2, 2: 2, 3: 1}
    assert all(_ns(b["compute_infer"]) > 0 for b in by_size.values())
    assert abs(int(stats["last_inference"]) - time.time() * 1000) < 60_000


def test_statistics_count_failures_and_cover_every_model(
    triton: TritonClientProcess, stats_server: ServerProcess
):
    code, _ = triton.run(
        triton_infer,
        stats_server.target,
        "mlp_slow",
        {"input": np.ones((1, 64), np.float32)},
        None,
        {"timeout": 50_000},
    )
    assert code == "DEADLINE_EXCEEDED"
    everything = triton.run(triton_statistics, stats_server.target)["model_stats"]
    assert sorted(s["name"] for s in everything) == ["mlp", "mlp_slow"]
    (slow,) = [s for s in everything if s["name"] == "mlp_slow"]
    assert _count(slow["inference_stats"]["fail"]) == 1
    assert _count(slow["inference_stats"].get("success", {})) == 0
    assert int(slow.get("execution_count", 0)) == 0
    (one,) = triton.run(triton_statistics, stats_server.target, "mlp_slow", "1")["model_stats"]
    assert one["version"] == "1"


def test_statistics_of_an_unknown_model_or_version_is_not_found(
    triton: TritonClientProcess, stats_server: ServerProcess
):
    for model, version, mention in (("nope", "", "'nope'"), ("mlp", "4", "version 4")):
        code, message = triton.run(triton_statistics, stats_server.target, model, version)["error"]
        assert code == "NOT_FOUND" and mention in message, (code, message)
