"""The `inferd` command line against a real server: `python -m inferd.cli` subprocesses."""

from __future__ import annotations

import subprocess
import sys

from integration_support import ServerProcess, free_port, server_env

TIMEOUT = 60.0


def inferd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferd.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=server_env(),
    )


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_predict_prints_output_name_dtype_and_shape(server: ServerProcess):
    result = inferd("predict", "mlp", "--url", server.target)
    assert result.returncode == 0, _explain(result)
    assert result.stdout.splitlines()[0] == "probabilities float32 [1, 10]", _explain(result)


def test_predict_with_batch_and_shapes(server: ServerProcess):
    result = inferd("predict", "mlp", "--batch", "3", "--url", server.target)
    assert result.returncode == 0, _explain(result)
    assert "probabilities float32 [3, 10]" in result.stdout, _explain(result)

    result = inferd(
        "predict",
        "text_encoder",
        "--shape",
        "input_ids=2,12",
        "--shape",
        "attention_mask=2,12",
        "--url",
        server.target,
    )
    assert result.returncode == 0, _explain(result)
    assert "embedding float32 [2, 128]" in result.stdout, _explain(result)


def test_predict_of_unknown_model_exits_nonzero_with_the_code(server: ServerProcess):
    result = inferd("predict", "no_such_model", "--url", server.target)
    assert result.returncode != 0, _explain(result)
    assert "NOT_FOUND" in result.stderr, _explain(result)


def test_status_lists_mlp_ready(server: ServerProcess):
    result = inferd("status", "--url", server.target)
    assert result.returncode == 0, _explain(result)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) >= {"mlp", "cnn", "text_encoder", "echo_bytes"}, _explain(result)
    assert rows["mlp"][1:3] == ["1", "READY"], _explain(result)


def test_status_of_one_model(server: ServerProcess):
    result = inferd("status", "mlp", "--url", server.target)
    assert result.returncode == 0, _explain(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[:3] == ["mlp", "1", "READY"], _explain(result)


def test_health_prints_serving_and_exits_zero(server: ServerProcess):
    result = inferd("health", "--url", server.target)
    assert result.returncode == 0, _explain(result)
    assert result.stdout.strip() == "SERVING", _explain(result)


def test_health_against_a_dead_port_exits_nonzero():
    result = inferd("health", "--url", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode != 0, _explain(result)
    assert "SERVING" not in result.stdout, _explain(result)
