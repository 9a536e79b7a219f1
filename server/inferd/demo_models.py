"""Builds the demo model repository: ``<out>/<model>/<version>/model.onnx`` (+ ``config.toml``).

Run ``python -m inferd.demo_models [--out DIR]``. Every model is generated from fixed seeds,
so building twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnxruntime 1.31 rejects the IR version that onnx 1.23 writes by default.
IR_VERSION = 10
OPSET = 17
BATCH_DIM = "batch"
SEQUENCE_DIM = "sequence"

MLP_CONFIG = """\
# Demo MLP: cheap per row, so batching pays off through fewer Python round trips.
max_batch_size = 64
max_queue_delay_us = 200
max_queue_size = 1024
instances = 1
"""

CNN_CONFIG = """\
# Demo CNN: compute-heavy; a short delay lets batches fill under load.
max_batch_size = 32
max_queue_delay_us = 1000
max_queue_size = 256
instances = 1
"""


def _he(rng: np.random.Generator, shape: Sequence[int], fan_in: int) -> np.ndarray:
    """He-normal FP32 weights, so activations keep a sane scale through the ReLUs."""
    weights: np.ndarray = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return weights


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name=name)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    """Wraps a graph into an opset-17, IR-10 model and validates it."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="inferd.demo_models",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_adder(c: float) -> onnx.ModelProto:
    """y = x + c, FP32 [batch, 4] -> [batch, 4]: the smallest model whose outputs say which
    file served them (tests of loading, reloading and repository scans)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "adder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.full(4, c, dtype=np.float32), "c")],
    )
    return _finish(graph)


def build_mlp() -> onnx.ModelProto:
    """``input`` FP32 [batch, 64] -> Gemm+Relu, Gemm, Softmax -> ``probabilities`` [batch, 10]."""
    rng = np.random.default_rng(1001)
    initializers = [
        _init("fc1.weight", _he(rng, (64, 128), 64)),
        _init("fc1.bias", np.zeros(128, dtype=np.float32)),
        _init("fc2.weight", _he(rng, (128, 10), 128)),
        _init("fc2.bias", np.zeros(10, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1"),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH_DIM, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [BATCH_DIM, 10])],
        initializer=initializers,
    )
    return _finish(graph)


def build_cnn() -> onnx.ModelProto:
    """``image`` FP32 [batch, 3, 64, 64] -> three conv blocks -> Gemm -> ``logits`` [batch, 100]."""
    rng = np.random.default_rng(2002)
    channels = [(3, 32), (32, 64), (64, 128)]
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x = "image"
    for i, (c_in, c_out) in enumerate(channels, start=1):
        initializers += [
            _init(f"conv{i}.weight", _he(rng, (c_out, c_in, 3, 3), c_in * 9)),
            _init(f"conv{i}.bias", np.zeros(c_out, dtype=np.float32)),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [x, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"),
        ]
        x = f"relu{i}"
        if i < len(channels):
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [x],
                    [f"pool{i}"],
                    name=f"pool{i}",
                    kernel_shape=[2, 2],
                    strides=[2, 2],
                )
            )
            x = f"pool{i}"
    initializers += [
        _init("fc.weight", (rng.standard_normal((128, 100)) / np.sqrt(128)).astype(np.float32)),
        _init("fc.bias", np.zeros(100, dtype=np.float32)),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH_DIM, 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH_DIM, 100])],
        initializer=initializers,
    )
    return _finish(graph)


def build_text_encoder() -> onnx.ModelProto:
    """``input_ids``/``attention_mask`` INT64 [batch, sequence] -> ``embedding`` FP32 [batch, 128].

    Embedding lookup, mean over the unmasked positions, then Gemm + Tanh.
    """
    rng = np.random.default_rng(3003)
    vocab, width = 1000, 128
    initializers = [
        _init("embedding.table", (rng.standard_normal((vocab, width)) * 0.5).astype(np.float32)),
        _init(
            "proj.weight", (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        ),
        _init("proj.bias", np.zeros(width, dtype=np.float32)),
        _init("axes.sequence", np.array([1], dtype=np.int64)),
        _init("axes.feature", np.array([2], dtype=np.int64)),
        _init("one", np.array(1.0, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node(
            "Gather", ["embedding.table", "input_ids"], ["tokens"], name="embed", axis=0
        ),
        helper.make_node(
            "Cast", ["attention_mask"], ["mask"], name="mask_cast", to=TensorProto.FLOAT
        ),
        helper.make_node("Unsqueeze", ["mask", "axes.feature"], ["mask3"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["tokens", "mask3"], ["masked"], name="apply_mask"),
        helper.make_node(
            "ReduceSum", ["masked", "axes.sequence"], ["summed"], name="sum_tokens", keepdims=0
        ),
        helper.make_node(
            "ReduceSum", ["mask", "axes.sequence"], ["count"], name="count_tokens", keepdims=1
        ),
        # An all-zero mask would otherwise divide by zero; its embedding is then tanh(bias).
        helper.make_node("Max", ["count", "one"], ["denominator"], name="clamp_count"),
        helper.make_node("Div", ["summed", "denominator"], ["pooled"], name="mean"),
        helper.make_node(
            "Gemm", ["pooled", "proj.weight", "proj.bias"], ["projected"], name="proj"
        ),
        helper.make_node("Tanh", ["projected"], ["embedding"], name="tanh"),
    ]
    sequence_shape = [BATCH_DIM, SEQUENCE_DIM]
    graph = helper.make_graph(
        nodes,
        "text_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, sequence_shape),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, sequence_shape),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [BATCH_DIM, width])],
        initializer=initializers,
    )
    return _finish(graph)


def build_echo_bytes() -> onnx.ModelProto:
    """``text`` STRING [batch] -> Identity -> ``echo`` STRING [batch]."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"], name="echo")],
        "echo_bytes",
        [helper.make_tensor_value_info("text", TensorProto.STRING, [BATCH_DIM])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, [BATCH_DIM])],
    )
    return _finish(graph)


DEMO_MODELS: dict[str, tuple[Callable[[], onnx.ModelProto], str | None]] = {
    "mlp": (build_mlp, MLP_CONFIG),
    "cnn": (build_cnn, CNN_CONFIG),
    "text_encoder": (build_text_encoder, None),
    "echo_bytes": (build_echo_bytes, None),
}


def _write_atomically(path: Path, data: bytes) -> None:
    """Writes through a temp file in the same directory so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; the server may run as another user.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_model(
    model: onnx.ModelProto,
    repository: Path,
    name: str,
    version: int = 1,
    config_toml: str | None = None,
) -> Path:
    """Writes ``<repository>/<name>/<version>/model.onnx`` (and ``config.toml`` if given).

    Returns the path of the written ``model.onnx``. An existing ``config.toml`` is left alone
    when ``config_toml`` is None.
    """
    if not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"model name must be a single directory name, got {name!r}")
    if version < 1:
        raise ValueError(f"model version must be a positive integer, got {version}")
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    if config_toml is not None:
        _write_atomically(model_dir / "config.toml", config_toml.encode("utf-8"))
    model_path = version_dir / "model.onnx"
    _write_atomically(model_path, model.SerializeToString(deterministic=True))
    return model_path


def build_demo_repository(out: Path) -> list[str]:
    """Builds every demo model into ``out`` and returns their names."""
    for name, (build, config_toml) in DEMO_MODELS.items():
        write_model(build(), Path(out), name, config_toml=config_toml)
    return list(DEMO_MODELS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the inferd demo model repository.")
    parser.add_argument("--out", type=Path, default=Path("models"), help="repository directory")
    args = parser.parse_args(argv)
    out: Path = args.out
    for name in build_demo_repository(out):
        print(f"{name}: {out / name / '1' / 'model.onnx'}")


if __name__ == "__main__":
    main()
