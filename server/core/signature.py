"""Derive a model's signature (inputs, outputs, datatypes, batch dim) from its ONNX graph and
config: what the frontends validate requests against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.core.errors import InvalidInput
from server.core.model_config import ModelConfig, ModelDefaults
from server.core.types import ModelSignature, TensorSpec

# ONNX Runtime's type strings -> wire datatype names.
ORT_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(bfloat16)": "BF16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# A dim as ONNX Runtime reports it: an int when fixed, a name or None when symbolic.
GraphDim = int | str | None


@dataclass(frozen=True, slots=True)
class GraphTensor:
    name: str
    ort_type: str
    shape: tuple[GraphDim, ...]


def _is_variable(dim: GraphDim) -> bool:
    return not isinstance(dim, int) or dim < 0


def graph_batches(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> bool:
    """Dim 0 is taken for a batch dim when every input and output has a variable dim 0."""
    tensors = [*inputs, *outputs]
    return bool(tensors) and all(t.shape and _is_variable(t.shape[0]) for t in tensors)


def derive_signature(
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    config: ModelConfig,
    defaults: ModelDefaults,
) -> ModelSignature:
    batches = graph_batches(inputs, outputs)
    if config.max_batch_size is None:
        max_batch_size = defaults.max_batch_size if batches else 0
    else:
        max_batch_size = config.max_batch_size
        if max_batch_size > 0 and not batches:
            fixed = next(
                t for t in [*inputs, *outputs] if not t.shape or not _is_variable(t.shape[0])
            )
            raise InvalidInput(
                f"config.toml: max_batch_size is {max_batch_size} but tensor '{fixed.name}' "
                f"has no variable dim 0 (shape {list(fixed.shape)}) to batch along"
            )

    def spec(t: GraphTensor) -> TensorSpec:
        datatype = ORT_DATATYPES.get(t.ort_type)
        if datatype is None:
            raise InvalidInput(f"tensor '{t.name}' has unsupported type {t.ort_type}")
        dims = t.shape[1:] if max_batch_size > 0 else t.shape
        return TensorSpec(t.name, datatype, tuple(-1 if _is_variable(d) else int(d) for d in dims))  # type: ignore[arg-type]

    return ModelSignature(
        inputs=tuple(spec(t) for t in inputs),
        outputs=tuple(spec(t) for t in outputs),
        max_batch_size=max_batch_size,
    )
