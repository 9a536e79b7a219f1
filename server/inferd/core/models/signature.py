"""Derive a model's signature (inputs, outputs, datatypes, batch dim) from its ONNX graph and
effective config: what the frontends validate requests against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inferd.core.errors import InvalidInput
from inferd.core.models.config import EffectiveConfig, TensorDeclaration
from inferd.core.types import ModelSignature, TensorSpec

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
    effective: EffectiveConfig,
) -> ModelSignature:
    """The graph's tensors narrowed by the config's declarations. max_batch_size: the config's
    (which needs a batch dim to batch along), else the server's default where the graph
    batches, else 0."""
    config = effective.config
    batches = graph_batches(inputs, outputs)
    if config.max_batch_size is None:
        max_batch_size = effective.default_max_batch_size if batches else 0
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
        return TensorSpec(
            t.name,
            datatype,
            tuple(-1 if not isinstance(d, int) or d < 0 else d for d in dims),
            tuple(d if isinstance(d, str) and d else None for d in dims),
        )

    return ModelSignature(
        inputs=_declare(tuple(spec(t) for t in inputs), config.inputs, "input"),
        outputs=_declare(tuple(spec(t) for t in outputs), config.outputs, "output"),
        max_batch_size=max_batch_size,
    )


def _declare(
    graph: tuple[TensorSpec, ...], declared: tuple[TensorDeclaration, ...], kind: str
) -> tuple[TensorSpec, ...]:
    """The graph's tensors narrowed by the config's declarations, which must agree with them."""
    if not declared:
        return graph
    by_name = {t.name: t for t in graph}
    narrowed = dict(by_name)
    for d in declared:
        found = by_name.get(d.name)
        if found is None:
            raise InvalidInput(
                f"config: {kind} '{d.name}' is not an {kind} of the model "
                f"(the graph has {sorted(by_name)})"
            )
        if d.datatype != found.datatype:
            raise InvalidInput(
                f"config: {kind} '{d.name}' is declared {d.datatype}; the graph has "
                f"{found.datatype}"
            )
        if len(d.dims) != len(found.dims):
            raise InvalidInput(
                f"config: {kind} '{d.name}' dims {list(d.dims)} have rank {len(d.dims)}; the "
                f"graph's (without a batch dim) are {list(found.dims)}"
            )
        dims = []
        for axis, (want, got) in enumerate(zip(d.dims, found.dims, strict=True)):
            if want >= 0 and got >= 0 and want != got:
                raise InvalidInput(
                    f"config: {kind} '{d.name}' dim {axis} is declared {want}; the graph has "
                    f"{got} (dims {list(found.dims)})"
                )
            dims.append(want if want >= 0 else got)
        narrowed[d.name] = TensorSpec(found.name, found.datatype, tuple(dims), found.dim_names)
    if kind == "input":
        missing = sorted(set(by_name) - {d.name for d in declared})
        if missing:
            raise InvalidInput(f"config: the graph's input(s) {missing} are not declared")
    return tuple(narrowed[t.name] for t in graph)
