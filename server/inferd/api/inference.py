"""Request decoding and validation shared by every frontend (native and Open Inference
Protocol), called by the data plane (`server/inferd/api/dataplane.py`): a wire tensor is checked
against the model's signature and the server's limits before any array is built, then decoded
by the wire codec (`inferd_wire.codec.from_wire`, the client's decoder too)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from inferd.core.errors import InvalidInput, clipped, quoted
from inferd.core.types import Array, ModelSignature
from inferd_wire.codec import element_count, from_wire


class TypedContents(Protocol):
    """Contents a frontend still has to convert to wire bytes (the Open Inference Protocol's
    typed fields): converted only once the tensor has passed every check, so that a request
    for a model that does not exist, or of the wrong shape, costs no conversion."""

    count: int
    """Elements it holds."""

    def to_bytes(self) -> bytes:
        """The wire contents; InvalidInput when a value does not fit the datatype."""
        ...


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as a frontend received it; `contents` is read from the message once."""

    name: str
    datatype: str
    shape: Sequence[int]
    contents: bytes | TypedContents


@dataclass(frozen=True, slots=True)
class Limits:
    max_elements: int
    """Elements per request, all inputs together."""
    max_bytes_elements: int = 1 << 20
    """BYTES elements per request, all inputs together: each becomes a Python object."""


# Decoding more than this many typed or BYTES elements (each a Python object) takes longer
# than ~2 ms: such a request decodes on a worker thread, not on the event loop.
HEAVY_ELEMENTS = 4096


def heavy(tensors: Sequence[WireTensor]) -> bool:
    """Whether decoding `tensors` would hold the event loop for more than a few milliseconds
    (see HEAVY_ELEMENTS); raw fixed-size tensors decode without a copy, whatever their size."""
    for tensor in tensors:
        contents = tensor.contents
        if isinstance(contents, bytes):
            if tensor.datatype == "BYTES" and element_count(tensor.shape) > HEAVY_ELEMENTS:
                return True
        elif contents.count > HEAVY_ELEMENTS:
            return True
    return False


def decode_inputs(
    model: str, signature: ModelSignature, tensors: Sequence[WireTensor], limits: Limits
) -> dict[str, Array]:
    inputs: dict[str, Array] = {}
    batch: tuple[str, int] | None = None
    # Symbolic dim name -> (input, axis, size) where first seen.
    named: dict[str, tuple[str, int, int]] = {}
    elements_total = text_total = 0
    for tensor in tensors:
        name = tensor.name
        spec = signature.input(name)
        if spec is None:
            expected = [s.name for s in signature.inputs]
            raise InvalidInput(
                f"input {quoted(name)} is not an input of model '{model}'; expected {expected}"
            )
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{name}': datatype {clipped(tensor.datatype) or '(empty)'} does not "
                f"match the model's {spec.datatype}"
            )
        shape = [int(d) for d in tensor.shape]
        expected_shape = list(signature.full_shape(spec))
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
        if len(shape) != len(expected_shape):
            raise InvalidInput(
                f"input '{name}': shape {shape} has rank {len(shape)}; the model expects rank "
                f"{len(expected_shape)} {expected_shape}"
            )
        offset = 1 if signature.batches else 0
        for axis, (got, want) in enumerate(zip(shape, expected_shape, strict=True)):
            if axis >= offset and want >= 0 and got != want:
                raise InvalidInput(
                    f"input '{name}': dim {axis} is {got}; the model expects {want} "
                    f"(shape {expected_shape})"
                )
        if signature.batches:
            rows = shape[0]
            if rows < 1:
                raise InvalidInput(f"input '{name}': batch dimension must be at least 1, got 0")
            if rows > signature.max_batch_size:
                raise InvalidInput(
                    f"input '{name}': batch dimension {rows} exceeds max_batch_size "
                    f"{signature.max_batch_size}"
                )
            if batch is None:
                batch = (name, rows)
            elif rows != batch[1]:
                raise InvalidInput(
                    f"input '{name}': batch dimension {rows} differs from input "
                    f"'{batch[0]}' ({batch[1]})"
                )
        for axis, dim_name in enumerate(spec.dim_names, start=offset):
            if dim_name is None:
                continue
            first = named.setdefault(dim_name, (name, axis, shape[axis]))
            if first[2] != shape[axis]:
                raise InvalidInput(
                    f"input '{name}': dim {axis} is {shape[axis]} but input '{first[0]}' dim "
                    f"{first[1]} is {first[2]}; the model names both '{dim_name}', so they "
                    "must agree"
                )
        count = element_count(shape)
        elements_total += count
        if elements_total > limits.max_elements:
            raise InvalidInput(
                f"input '{name}': {elements_total} elements in the request exceed the limit "
                f"of {limits.max_elements}"
            )
        if spec.datatype == "BYTES":
            text_total += count
            if text_total > limits.max_bytes_elements:
                raise InvalidInput(
                    f"input '{name}': {text_total} BYTES elements in the request exceed the "
                    f"limit of {limits.max_bytes_elements}"
                )
        contents = tensor.contents
        if not isinstance(contents, bytes):
            contents = contents.to_bytes()
        inputs[name] = _array(name, spec.datatype, shape, count, contents)
    missing = [s.name for s in signature.inputs if s.name not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s) {missing} for model '{model}'")
    return inputs


def _array(name: str, datatype: str, shape: list[int], count: int, contents: bytes) -> Array:
    if datatype == "BYTES":
        return _text(name, contents, count).reshape(shape)
    try:
        return from_wire(datatype, shape, contents)
    except ValueError as exc:
        raise InvalidInput(f"input '{name}': {exc}") from None


_LENGTH = struct.Struct("<I")


def _text(name: str, raw: bytes, count: int) -> Array:
    """BYTES elements as `str` (ONNX Runtime takes string tensors as str: bytes objects would
    reach the model as "b'...'", and text it cannot encode fails the whole batch, so UTF-8 is
    checked here), in one pass over the length-prefixed contents. The count is checked against
    what the bytes can hold before anything is allocated."""
    size = len(raw)
    if count > size // _LENGTH.size:
        raise InvalidInput(
            f"input '{name}': {size} bytes cannot hold {count} BYTES elements (each needs a "
            "4-byte length)"
        )
    out = np.empty(count, dtype=object)
    unpack = _LENGTH.unpack_from
    offset = 0
    for i in range(count):
        if offset + 4 > size:
            raise InvalidInput(
                f"input '{name}': BYTES element {i}: length prefix runs past the end of the "
                "contents"
            )
        (length,) = unpack(raw, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise InvalidInput(
                f"input '{name}': BYTES element {i}: declares {length} bytes, only "
                f"{size - offset} remain"
            )
        try:
            out[i] = raw[offset:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input '{name}' (element {i}): {exc}") from None
        offset = end
    if offset != size:
        raise InvalidInput(
            f"input '{name}': {size - offset} bytes left over after {count} BYTES elements"
        )
    return out


def check_outputs(model: str, signature: ModelSignature, names: Sequence[str]) -> tuple[str, ...]:
    known = {s.name for s in signature.outputs}
    seen: set[str] = set()
    for name in names:
        if name not in known:
            raise InvalidInput(
                f"requested output {quoted(name)} is not an output of model '{model}'; "
                f"expected {sorted(known)}"
            )
        if name in seen:
            raise InvalidInput(f"requested output '{name}' appears more than once")
        seen.add(name)
    return tuple(names)


def absolute_deadline(
    time_remaining: float | None, timeout_us: int, default_timeout: float | None
) -> float | None:
    """The sooner of the gRPC deadline and the request's timeout (else the model's default),
    on the event loop's clock."""
    budgets = [t for t in (time_remaining, timeout_us / 1e6 if timeout_us else None) if t]
    if not budgets and default_timeout:
        budgets = [default_timeout]
    if not budgets:
        return None
    return asyncio.get_running_loop().time() + min(budgets)
