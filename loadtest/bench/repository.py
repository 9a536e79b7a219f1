"""The model repository the benchmark suite serves: the demo models, plus

- `mlp_nobatch`: the demo MLP with batching off (max_batch_size 1; 0 would mean "no batch
  dimension" to inferd, and then a client batch of 1 would be a different request shape);
- `tiny`: one 16x16 MatMul, so small that a request's cost is all serving overhead (the model
  for peak RPC rate and for the peers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inferd.core.models.config import load_model_config
from inferd.demo_models import (
    BATCH_DIM,
    IR_VERSION,
    MLP_CONFIG,
    OPSET,
    build_demo_repository,
    build_mlp,
    write_model,
)

UNBATCHED_MLP_CONFIG = """\
# The demo MLP with batching off: every request executes alone.
max_batch_size = 1
max_queue_delay_us = 0
max_queue_size = 1024
instances = 1
"""

TINY_CONFIG = MLP_CONFIG.replace("# Demo MLP", "# Tiny MatMul (benchmarks)")
TINY_WIDTH = 16


@dataclass(frozen=True)
class Batching:
    """The batching settings a peer server is given, copied from inferd's config.toml."""

    max_batch_size: int
    max_queue_delay_us: int


def build_tiny() -> onnx.ModelProto:
    """`input` FP32 [batch, 16] -> MatMul -> `output` FP32 [batch, 16]."""
    rng = np.random.default_rng(4004)
    weight = numpy_helper.from_array(
        (rng.standard_normal((TINY_WIDTH, TINY_WIDTH)) / 4).astype(np.float32), name="weight"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"], name="matmul")],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH_DIM, TINY_WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [BATCH_DIM, TINY_WIDTH])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def build_bench_repository(out: Path) -> Path:
    build_demo_repository(out)
    write_model(build_mlp(), out, "mlp_nobatch", config_toml=UNBATCHED_MLP_CONFIG)
    write_model(build_tiny(), out, "tiny", config_toml=TINY_CONFIG)
    return out


def model_file(repository: Path, model: str) -> Path:
    return repository / model / "1" / "model.onnx"


def batching_of(repository: Path, model: str) -> Batching:
    """The model's batching settings from its config.toml, for peers to mirror."""
    config = load_model_config(repository / model / "config.toml")
    return Batching(
        max_batch_size=config.max_batch_size if config.max_batch_size is not None else 32,
        max_queue_delay_us=config.max_queue_delay_us or 0,
    )
