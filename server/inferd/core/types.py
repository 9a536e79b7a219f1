"""Values that travel through the core: tensor specs, signatures, requests and results.

Only numpy and the standard library here; no gRPC and no protobuf types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

Array = npt.NDArray[Any]


class ModelState(enum.Enum):
    UNKNOWN = "UNKNOWN"
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output: name, wire datatype and the dims after the batch dim.

    `dims` uses -1 for a variable dimension. The batch dim, when the model has one, is not in
    `dims`; `ModelSignature.max_batch_size > 0` says it is there.
    """

    name: str
    datatype: str
    dims: tuple[int, ...]
    # Per dim of `dims`, the graph's symbolic name of a variable dim (None when fixed or
    # unnamed): inputs sharing a name (e.g. "sequence") must agree on its size.
    dim_names: tuple[str | None, ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # 0: no batch dim; requests are executed one at a time, as sent.
    max_batch_size: int

    @property
    def batches(self) -> bool:
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def full_shape(self, spec: TensorSpec) -> tuple[int, ...]:
        """The shape a client sees, with -1 for the batch dim when the model batches."""
        return ((-1,) if self.batches else ()) + spec.dims


@dataclass(slots=True, eq=False)
class InferRequest:
    """A decoded, validated request, ready for the batcher."""

    model: str
    inputs: dict[str, Array]
    # Output names to return; empty returns all.
    outputs: tuple[str, ...] = ()
    version: int | None = None
    id: str = ""
    # Smaller runs first.
    priority: int = 0
    # Absolute time on the event loop's clock (`loop.time()`); None for no deadline.
    deadline: float | None = None
    # Opaque to the core: the frontend's trace context, handed back to the observer.
    trace_context: Any = None


@dataclass(frozen=True, slots=True)
class InferResult:
    model: str
    version: int
    outputs: dict[str, Array]
    # Seconds spent waiting in the queue, and executing the batch it rode in.
    queue_time: float
    compute_time: float
    batch_rows: int


def shape_key_of(inputs: dict[str, Array], batches: bool) -> tuple[Any, ...]:
    """The key under which requests can share a batch: each input's dtype and non-batch dims."""
    skip = 1 if batches else 0
    return tuple(
        (name, array.dtype.str, array.shape[skip:]) for name, array in sorted(inputs.items())
    )


def rows_of(inputs: dict[str, Array], batches: bool) -> int:
    if not batches or not inputs:
        return 1
    return int(next(iter(inputs.values())).shape[0])


__all__ = [
    "Array",
    "InferRequest",
    "InferResult",
    "ModelSignature",
    "ModelState",
    "TensorSpec",
    "rows_of",
    "shape_key_of",
]
