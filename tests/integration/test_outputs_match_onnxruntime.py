"""Served outputs equal in-process ONNX Runtime's on the same model file and the same inputs.

The reference is `onnxruntime.InferenceSession(<the model.onnx the server loaded>,
providers=["CPUExecutionProvider"])`, run in this process.

Tolerance. Floats are compared with rtol=1e-5, atol=1e-6 (`integration_support.RTOL/ATOL`).
Both sides run the same ONNX Runtime build and the same CPU kernels on the same rows, so most
values are bit-identical; but the server may run a request inside a larger batch (it
concatenates concurrent requests along dim 0), and a GEMM or convolution over more rows may
block its loops differently and so sum in another order: a few ULPs of FP32 (relative ~1e-7,
observed well below 1e-5). Softmax and tanh outputs live in [0, 1] / [-1, 1], where atol=1e-6
covers values near zero. Integers and BYTES are compared exactly.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from integration_support import (
    ServerFactory,
    ServerProcess,
    assert_outputs_match,
    cnn_input,
    echo_input,
    mlp_input,
    model_file,
    reference_outputs,
    text_input,
)
from onnx import TensorProto, helper

from inferd.demo_models import write_model
from inferd_client import AsyncInferClient, InferClient, InvalidInputError


@pytest.mark.parametrize("rows", [1, 3])
def test_mlp_outputs_match_onnxruntime(client: InferClient, demo_repository: Path, rows: int):
    inputs = mlp_input(np.random.default_rng(10 + rows), rows)
    served = client.infer("mlp", inputs)
    expected = reference_outputs(model_file(demo_repository, "mlp"), inputs)
    assert_outputs_match(served, expected, f"mlp rows={rows}")
    np.testing.assert_allclose(served["probabilities"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_cnn_outputs_match_onnxruntime(client: InferClient, demo_repository: Path, rows: int):
    inputs = cnn_input(np.random.default_rng(20 + rows), rows)
    served = client.infer("cnn", inputs)
    expected = reference_outputs(model_file(demo_repository, "cnn"), inputs)
    assert_outputs_match(served, expected, f"cnn rows={rows}")


@pytest.mark.parametrize("length", [5, 23])
@pytest.mark.parametrize("rows", [1, 3])
def test_text_encoder_outputs_match_onnxruntime(
    client: InferClient, demo_repository: Path, rows: int, length: int
):
    inputs = text_input(np.random.default_rng(30 + rows * length), rows, length)
    served = client.infer("text_encoder", inputs)
    expected = reference_outputs(model_file(demo_repository, "text_encoder"), inputs)
    assert_outputs_match(served, expected, f"text_encoder rows={rows} length={length}")
    assert served["embedding"].shape == (rows, 128)


def test_text_encoder_all_masked_row_matches_onnxruntime(
    client: InferClient, demo_repository: Path
):
    """A row with an all-zero attention mask (the model clamps the divisor to 1)."""
    inputs = text_input(np.random.default_rng(39), 2, 7)
    inputs["attention_mask"][1] = 0
    served = client.infer("text_encoder", inputs)
    expected = reference_outputs(model_file(demo_repository, "text_encoder"), inputs)
    assert_outputs_match(served, expected, "text_encoder all-masked row")
    assert np.isfinite(served["embedding"]).all()


@pytest.mark.parametrize(
    "texts",
    [
        pytest.param(["héllo wörld ✓"], id="one-non-ascii"),
        pytest.param([""], id="one-empty"),
        pytest.param(["日本語のテキスト", "", "emoji 🎉 tab\t newline\n end"], id="three-mixed"),
    ],
)
def test_echo_bytes_returns_utf8_text_exactly(
    client: InferClient, demo_repository: Path, texts: list[str]
):
    inputs = echo_input(texts)
    served = client.infer("echo_bytes", inputs)
    expected = reference_outputs(model_file(demo_repository, "echo_bytes"), inputs)
    assert_outputs_match(served, expected, f"echo_bytes {texts!r}")
    assert list(served["echo"]) == [t.encode("utf-8") for t in texts]


def test_echo_bytes_accepts_raw_utf8_bytes_input(client: InferClient):
    """bytes elements travel unchanged and come back as the same bytes."""
    payload = ["ünïcödé".encode(), b"", b"plain"]
    served = client.infer("echo_bytes", {"text": np.array(payload, dtype=object)})
    assert list(served["echo"]) == payload


def test_requesting_the_only_output_by_name(client: InferClient, demo_repository: Path):
    inputs = mlp_input(np.random.default_rng(40), 2)
    served = client.infer("mlp", inputs, outputs=["probabilities"])
    expected = reference_outputs(model_file(demo_repository, "mlp"), inputs)
    assert_outputs_match(served, expected, "mlp outputs=[probabilities]")


def test_internal_node_name_is_not_an_output(client: InferClient):
    """'logits' is a tensor inside the mlp graph, not one of its outputs."""
    with pytest.raises(InvalidInputError) as info:
        client.infer("mlp", mlp_input(np.random.default_rng(41), 1), outputs=["logits"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'logits'" in info.value.details


# --- a model with two outputs -------------------------------------------------------------------

BATCHED_ROWS = 6


def build_two_outputs() -> onnx.ModelProto:
    """x FP32 [batch, 4] -> doubled = x + x, negated = -x."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "x"], ["doubled"], name="double"),
            helper.make_node("Neg", ["x"], ["negated"], name="negate"),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("negated", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def two_outputs_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("two_outputs_repository")
    write_model(build_two_outputs(), repo, "two_outputs")
    # A batch closes only when it holds BATCHED_ROWS rows (or after 5 s): requests sent
    # together share one execution, deterministically.
    write_model(
        build_two_outputs(),
        repo,
        "two_outputs_batched",
        config_toml=f"max_batch_size = {BATCHED_ROWS}\nmax_queue_delay_us = 5000000\n",
    )
    return repo


@pytest.fixture(scope="module")
def outputs_server(
    module_server_factory: ServerFactory, two_outputs_repository: Path
) -> ServerProcess:
    return module_server_factory(two_outputs_repository)


@pytest.fixture
def outputs_client(outputs_server: ServerProcess):
    with InferClient(outputs_server.target) as c:
        yield c


def _x(rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)}


@pytest.mark.parametrize(
    "wanted",
    [None, ["negated"], ["doubled"], ["negated", "doubled"]],
    ids=["all", "negated", "doubled", "both-reordered"],
)
def test_requested_output_subset_returns_only_those_outputs(
    outputs_client: InferClient,
    two_outputs_repository: Path,
    wanted: list[str] | None,
):
    inputs = _x(3, 50)
    served = outputs_client.infer("two_outputs", inputs, outputs=wanted)
    expected = reference_outputs(model_file(two_outputs_repository, "two_outputs"), inputs, wanted)
    assert set(served) == set(wanted or ["doubled", "negated"])
    assert_outputs_match(served, expected, f"two_outputs outputs={wanted}")


def test_unknown_output_name_is_invalid_argument(outputs_client: InferClient):
    with pytest.raises(InvalidInputError) as info:
        outputs_client.infer("two_outputs", _x(1, 51), outputs=["negated", "tripled"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'tripled'" in info.value.details


def test_duplicate_output_name_is_invalid_argument(outputs_client: InferClient):
    with pytest.raises(InvalidInputError) as info:
        outputs_client.infer("two_outputs", _x(1, 52), outputs=["negated", "negated"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'negated'" in info.value.details


async def test_requests_sharing_a_batch_each_get_only_their_own_outputs(
    outputs_server: ServerProcess, two_outputs_repository: Path
):
    """Requests with different output subsets run in one execution (the batch computes the
    union); each response still holds exactly the outputs it asked for, of its own rows."""
    subsets: list[list[str] | None] = [["negated"], ["doubled"], None, ["negated"], None, []]
    assert len(subsets) == BATCHED_ROWS
    path = model_file(two_outputs_repository, "two_outputs_batched")
    async with AsyncInferClient(outputs_server.target) as aclient:
        inputs = [_x(1, 60 + i) for i in range(BATCHED_ROWS)]
        served = await asyncio.gather(
            *(
                aclient.infer("two_outputs_batched", x, outputs=wanted, timeout=60)
                for x, wanted in zip(inputs, subsets, strict=True)
            )
        )
        status = (await aclient.status("two_outputs_batched"))[0].statistics
    for i, (got, x, wanted) in enumerate(zip(served, inputs, subsets, strict=True)):
        assert_outputs_match(got, reference_outputs(path, x, wanted or None), f"request {i}")
    assert status["batch_sizes"] == {BATCHED_ROWS: 1}, status
    assert status["inference_count"] == BATCHED_ROWS
