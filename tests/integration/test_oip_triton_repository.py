"""A Triton model repository (`<model>/config.pbtxt`), the one under examples/, served by
inferd and used through tritonclient: its configuration is what the model runs with, a model
Triton's ONNX Runtime backend would refuse is skipped with its reason, and the others serve."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import test_oip_tritonclient
from integration_support import (
    ServerFactory,
    ServerProcess,
    assert_outputs_match,
    echo_input,
    mlp_input,
    model_file,
    reference_outputs,
    text_input,
)
from test_oip_tritonclient import TritonClientProcess, triton_infer, triton_json

from inferd.demo_models import build_mlp, write_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triton_repository"
# RepositoryIndex is a control RPC: it needs the server's control token, as tritonclient's
# `headers` send it.
TOKEN = "triton-repository-test-token"
AUTHORIZATION = {"authorization": f"Bearer {TOKEN}"}

triton = test_oip_tritonclient.triton


def _build_example(out: Path) -> None:
    spec = importlib.util.spec_from_file_location("triton_example_build", EXAMPLE / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build_triton_repository(out)


@pytest.fixture(scope="module")
def triton_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("triton_repository")
    _build_example(repo)
    write_model(build_mlp(), repo, "tensorrt_model")
    (repo / "tensorrt_model" / "config.pbtxt").write_text('platform: "tensorrt_plan"\n')
    write_model(build_mlp(), repo, "wrong_dims")
    (repo / "wrong_dims" / "config.pbtxt").write_text(
        'max_batch_size: 4\ninput [ { name: "input" data_type: TYPE_FP32 dims: [ 32 ] } ]\n'
    )
    return repo


@pytest.fixture(scope="module")
def triton_server(module_server_factory: ServerFactory, triton_repository: Path) -> ServerProcess:
    return module_server_factory(triton_repository, env={"INFERD_CONTROL_TOKEN": TOKEN})


def _log_messages(server: ServerProcess) -> list[str]:
    messages = []
    for line in server.log_text().splitlines():
        try:
            messages.append(json.loads(line)["message"])
        except (ValueError, KeyError, TypeError):
            messages.append(line)
    return messages


def test_config_pbtxt_is_what_the_model_runs_with(
    triton: TritonClientProcess, triton_server: ServerProcess
):
    config = triton.run(triton_json, triton_server.target, "get_model_config", "mlp")["config"]
    assert config["max_batch_size"] == 16
    batching = config["dynamic_batching"]
    assert batching["preferred_batch_size"] == [4, 8]
    assert batching["max_queue_delay_microseconds"] == "500"
    assert batching["default_queue_policy"]["max_queue_size"] == 128
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == "2000000"
    assert config["instance_group"][0]["count"] == 2
    echo = triton.run(triton_json, triton_server.target, "get_model_metadata", "echo_bytes")
    assert echo["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]


def test_every_model_of_the_example_serves(
    triton: TritonClientProcess, triton_server: ServerProcess, triton_repository: Path
):
    rng = np.random.default_rng(11)
    for model, inputs in (
        ("mlp", mlp_input(rng, 5)),
        ("text_encoder", text_input(rng, 3, 6)),
        ("echo_bytes", echo_input(["a", "bc"])),
    ):
        served = triton.run(triton_infer, triton_server.target, model, inputs)
        expected = reference_outputs(model_file(triton_repository, model), inputs)
        assert_outputs_match(served, expected, f"triton repository {model}")


def test_max_batch_size_from_config_pbtxt_is_enforced(
    triton: TritonClientProcess, triton_server: ServerProcess
):
    code, message = triton.run(
        triton_infer, triton_server.target, "mlp", {"input": np.ones((17, 64), np.float32)}
    )
    assert code == "INVALID_ARGUMENT"
    assert "max_batch_size 16" in message


def test_models_triton_would_refuse_are_skipped_or_failed_with_their_reason(
    triton: TritonClientProcess, triton_server: ServerProcess
):
    index = triton.run(
        triton_json, triton_server.target, "get_model_repository_index", AUTHORIZATION
    )
    states = {m["name"]: (m["state"], m.get("reason", "")) for m in index["models"]}
    assert sorted(states) == ["echo_bytes", "mlp", "text_encoder", "wrong_dims"]
    assert {states[name][0] for name in ("echo_bytes", "mlp", "text_encoder")} == {"READY"}
    # A platform inferd does not serve is skipped when the repository is read; declared tensors
    # that contradict the graph fail that version's load, visibly.
    assert states["wrong_dims"][0] == "UNAVAILABLE"
    assert "dim 0 is declared 32" in states["wrong_dims"][1]
    log = "\n".join(_log_messages(triton_server))
    assert "model 'tensorrt_model' skipped" in log and "'tensorrt_plan'" in log


def test_unsupported_fields_are_logged_once_by_name(triton_server: ServerProcess):
    warnings = [m for m in _log_messages(triton_server) if "does not support" in m]
    assert warnings == [
        "model 'text_encoder': config.pbtxt sets fields inferd does not support (ignored): "
        "model_warmup"
    ]
    assert sum("(Triton format)" in m for m in _log_messages(triton_server)) == 5
