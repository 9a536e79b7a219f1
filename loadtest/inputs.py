"""Request inputs: random data of the model's declared shapes, or arrays from .npy/.npz files.

Every request of a run carries one of a few prepared payloads (dicts of numpy arrays), made
once before the load starts; the generator then only re-sends serialised bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferd_wire.codec import DTYPES

Payload = dict[str, np.ndarray]

# Distinct payloads per run: enough that no layer can answer from a cache of the last input.
DEFAULT_DISTINCT_PAYLOADS = 4


@dataclass(frozen=True)
class TensorSpec:
    """An input a model declares: Open Inference Protocol datatype; -1 marks a variable dim."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSignature:
    """The inputs of the model under test and whether dim 0 is a batch dimension."""

    model: str
    inputs: tuple[TensorSpec, ...]
    batched: bool


class InputError(ValueError):
    """The inputs asked for do not fit the model (missing --shape, wrong file, ...)."""


def parse_shapes(values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """`NAME=D0,D1,...` (the full shape, batch dim included) -> {name: shape}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.partition("=")
        if not sep or not name:
            raise InputError(f"--shape takes NAME=D0,D1,..., got {value!r}")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise InputError(f"--shape {value!r}: dimensions must be integers") from None
        if any(d < 0 for d in shape):
            raise InputError(f"--shape {value!r}: dimensions must be >= 0")
        shapes[name] = shape
    return shapes


def load_input_files(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """`NAME=FILE.npy` pairs and/or `FILE.npz` archives (keys are input names) -> arrays."""
    arrays: dict[str, np.ndarray] = {}
    for value in paths:
        name, sep, path = value.partition("=")
        if sep:
            arrays[name] = np.load(Path(path), allow_pickle=False)
            continue
        if not value.endswith(".npz"):
            raise InputError(f"--input {value!r}: a bare path must be an .npz; use NAME=FILE.npy")
        with np.load(Path(value), allow_pickle=False) as archive:
            for key in archive.files:
                arrays[key] = archive[key]
    return arrays


def random_array(datatype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random values of `datatype`: normal floats, small non-negative integers, short texts."""
    if datatype == "BYTES":
        count = int(np.prod(shape)) if shape else 1
        texts = [f"request text {int(rng.integers(0, 1_000_000))}".encode() for _ in range(count)]
        return np.array(texts, dtype=object).reshape(tuple(shape))
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InputError(f"datatype {datatype!r} is not one random inputs can be made of")
    if dtype.kind == "f":
        return rng.standard_normal(tuple(shape)).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, tuple(shape)).astype(dtype)
    return rng.integers(0, 100, tuple(shape)).astype(dtype)


def request_shape(
    spec: TensorSpec, batched: bool, client_batch: int, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, ...]:
    """The concrete shape of one input in one request."""
    if spec.name in shapes:
        shape = shapes[spec.name]
        if len(shape) != len(spec.shape):
            raise InputError(
                f"--shape {spec.name}: rank {len(shape)}, the model declares {list(spec.shape)}"
            )
        return shape
    dims = list(spec.shape)
    if batched:
        dims[0] = client_batch
    variable = [i for i, d in enumerate(dims) if d < 0]
    if variable:
        raise InputError(
            f"input '{spec.name}' has variable dims {list(spec.shape)}; "
            f"give its full shape with --shape {spec.name}=D0,D1,..."
        )
    return tuple(dims)


def build_payloads(
    signature: ModelSignature,
    client_batch: int = 1,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    files: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    distinct: int = DEFAULT_DISTINCT_PAYLOADS,
) -> list[Payload]:
    """`distinct` payloads for the model; file inputs are the same in all of them."""
    shapes = shapes or {}
    files = files or {}
    unknown = sorted(set(files) - {s.name for s in signature.inputs})
    if unknown:
        raise InputError(f"input file(s) for {unknown}: the model has no such input")
    if not signature.batched and client_batch != 1:
        raise InputError(f"model '{signature.model}' has no batch dimension; --client-batch 1")
    rng = np.random.default_rng(seed)
    payloads: list[Payload] = []
    for _ in range(max(1, distinct)):
        payload: Payload = {}
        for spec in signature.inputs:
            if spec.name in files:
                payload[spec.name] = files[spec.name]
            else:
                shape = request_shape(spec, signature.batched, client_batch, shapes)
                payload[spec.name] = random_array(spec.datatype, shape, rng)
        payloads.append(payload)
    return payloads


def rows_of(payload: Payload, batched: bool) -> int:
    """Rows a request carries: its dim 0 when the model batches, else 1."""
    if not batched or not payload:
        return 1
    first = next(iter(payload.values()))
    return int(first.shape[0]) if first.ndim else 1
