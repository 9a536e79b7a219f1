"""Request decoding and validation shared by every frontend (native and Open Inference
Protocol): a wire tensor is checked against the model's signature and the server's limits
before any array is built, then viewed in place with np.frombuffer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inferd.api.status import status_code
from inferd.core.errors import InferdError, InvalidInput
from inferd.core.models.registry import ModelRegistry, ModelVersion
from inferd.core.observer import Observer
from inferd.core.types import Array, InferRequest, InferResult, ModelSignature
from inferd_wire.codec import DTYPES, unpack_bytes_elements


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A tensor as a frontend received it; `contents` is read from the message once."""

    name: str
    datatype: str
    shape: Sequence[int]
    contents: bytes


class Accounting:
    """Reports one request's outcome to the observer when its handler ends, however it ends.

    The model label is the requested name only when the server serves such a model, so that
    made-up names cannot create metric series without bound. A handler cancelled after its
    gRPC deadline counts as DEADLINE_EXCEEDED (that is what its client sees), not CANCELLED.
    """

    def __init__(
        self,
        observer: Observer,
        registry: ModelRegistry,
        protocol: str,
        model: str,
        time_remaining: float | None,
    ) -> None:
        self._observer = observer
        self._registry = registry
        self._protocol = protocol
        self._model = model
        self._started = time.perf_counter()
        self._deadline = None if time_remaining is None else self._started + time_remaining
        self.version: int | None = None

    def __enter__(self) -> Accounting:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        now = time.perf_counter()
        if exc is None:
            code = "OK"
        elif isinstance(exc, InferdError):
            code = status_code(exc).name
        elif isinstance(exc, asyncio.CancelledError):
            late = self._deadline is not None and now >= self._deadline - _DEADLINE_SLACK
            code = "DEADLINE_EXCEEDED" if late else "CANCELLED"
        else:
            code = "INTERNAL"
        label = self._model if self._registry.knows(self._model) else ""
        self._observer.request_finished(
            self._protocol, label, self.version, code, now - self._started
        )


# gRPC cancels a handler at its deadline, measured on another clock: allow for the skew.
_DEADLINE_SLACK = 0.005


@dataclass(frozen=True, slots=True)
class Limits:
    max_elements: int
    """Elements per request, all inputs together."""


def decode_inputs(
    model: str, signature: ModelSignature, tensors: Sequence[WireTensor], limits: Limits
) -> dict[str, Array]:
    inputs: dict[str, Array] = {}
    batch: tuple[str, int] | None = None
    # Symbolic dim name -> (input, axis, size) where first seen.
    named: dict[str, tuple[str, int, int]] = {}
    elements_total = 0
    for tensor in tensors:
        name = tensor.name
        spec = signature.input(name)
        if spec is None:
            expected = [s.name for s in signature.inputs]
            raise InvalidInput(
                f"input '{name}' is not an input of model '{model}'; expected {expected}"
            )
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{name}': datatype {tensor.datatype or '(empty)'} does not match the "
                f"model's {spec.datatype}"
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
        count = 1
        for d in shape:
            count *= d
        elements_total += count
        if elements_total > limits.max_elements:
            raise InvalidInput(
                f"input '{name}': {elements_total} elements in the request exceed the limit "
                f"of {limits.max_elements}"
            )
        inputs[name] = _array(name, spec.datatype, shape, count, tensor.contents)
    missing = [s.name for s in signature.inputs if s.name not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s) {missing} for model '{model}'")
    return inputs


def _array(name: str, datatype: str, shape: list[int], count: int, contents: bytes) -> Array:
    if datatype == "BYTES":
        try:
            elements = unpack_bytes_elements(contents, count)
            # ONNX Runtime takes string tensors as str (bytes objects reach the model as
            # "b'...'"), and fails the whole batch on text it cannot encode: check it here.
            for i, element in enumerate(elements):
                elements[i] = element.decode("utf-8")
        except ValueError as exc:
            where = f" (element {i})" if isinstance(exc, UnicodeDecodeError) else ""
            raise InvalidInput(f"input '{name}'{where}: {exc}") from None
        return elements.reshape(shape)
    dtype = DTYPES[datatype]
    needed = count * dtype.itemsize
    if len(contents) != needed:
        raise InvalidInput(
            f"input '{name}': contents hold {len(contents)} bytes; shape {shape} of "
            f"{datatype} needs {needed}"
        )
    return np.frombuffer(contents, dtype=dtype).reshape(shape)


def check_outputs(model: str, signature: ModelSignature, names: Sequence[str]) -> tuple[str, ...]:
    known = {s.name for s in signature.outputs}
    seen: set[str] = set()
    for name in names:
        if name not in known:
            raise InvalidInput(
                f"requested output '{name}' is not an output of model '{model}'; "
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


async def infer(
    registry: ModelRegistry,
    limits: Limits,
    *,
    model: str,
    version: int | None,
    tensors: Sequence[WireTensor],
    outputs: Sequence[str],
    request_id: str,
    priority: int,
    timeout_us: int,
    time_remaining: float | None,
    trace_context: object = None,
    accounting: Accounting | None = None,
) -> tuple[ModelVersion, InferResult]:
    """Resolve, validate, decode and run one request: the whole path every frontend shares."""
    if not model:
        raise InvalidInput("model: the model name is empty")
    target = registry.resolve(model, version)
    if accounting is not None:
        accounting.version = target.version
    signature = target.signature
    assert signature is not None
    request = InferRequest(
        model=model,
        inputs=decode_inputs(model, signature, tensors, limits),
        outputs=check_outputs(model, signature, outputs),
        version=target.version,
        id=request_id,
        priority=priority,
        deadline=absolute_deadline(time_remaining, timeout_us, target.default_timeout),
        trace_context=trace_context,
    )
    return target, await target.infer(request)
