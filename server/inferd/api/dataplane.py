"""The data plane: what every frontend (native, Open Inference Protocol) asks of the server,
in protocol-neutral terms. A frontend translates its protobuf message into an
`InferenceRequest`, and the `InferenceResponse` back; everything between (routing, validation,
deadlines, metrics, traces) happens here, once, for every protocol.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from inferd.api.inference import (
    HEAVY_ELEMENTS,
    Limits,
    WireTensor,
    absolute_deadline,
    check_outputs,
    decode_inputs,
    heavy,
)
from inferd.api.status import status_code
from inferd.core.admission import ByteBudget, RequestMemory
from inferd.core.batching.batcher import DEADLINE_SLACK
from inferd.core.errors import InferdError, InvalidInput, ModelNotFound
from inferd.core.models.registry import (
    LoadedVersion,
    ModelRegistry,
    ModelStatusEvent,
    ModelVersion,
)
from inferd.core.observer import Observer
from inferd.core.types import Array, InferRequest, InferResult, ModelState
from inferd.observability.tracing import RequestTracing
from inferd_wire.codec import to_wire

Reply = TypeVar("Reply")


@dataclass(frozen=True, slots=True)
class InferenceRequest:
    """One inference request as a frontend decoded it, before any validation."""

    model: str
    version: int | None
    """None: the newest READY version."""
    inputs: Sequence[WireTensor]
    outputs: Sequence[str]
    """Output names to return; empty returns all."""
    id: str = ""
    priority: int = 0
    timeout_us: int = 0
    """0: no timeout of its own (the model's default applies, if the call has no deadline)."""


@dataclass(frozen=True, slots=True)
class InferenceResponse:
    """One answered request, its outputs already in wire form (in the model's output order)."""

    model: str
    version: int
    id: str
    outputs: tuple[WireTensor, ...]


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
        self.started = time.perf_counter()
        self._deadline = None if time_remaining is None else self.started + time_remaining
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
            late = self._deadline is not None and now >= self._deadline - DEADLINE_SLACK
            code = "DEADLINE_EXCEEDED" if late else "CANCELLED"
        else:
            code = "INTERNAL"
        label = self._model if self._registry.knows(self._model) else ""
        self._observer.request_finished(
            self._protocol, label, self.version, code, now - self.started
        )


class DataPlane:
    """Owns the registry, the request limits, the observer and request tracing; both
    frontends hold the same one (built by `server/inferd/app.py`)."""

    def __init__(
        self,
        registry: ModelRegistry,
        limits: Limits,
        observer: Observer,
        tracing: RequestTracing,
        budget: ByteBudget | None = None,
    ) -> None:
        """`budget`: the server's bytes of requests in flight (`api/wire.py` charges each
        message on arrival; a model's memory estimate beyond that is charged here)."""
        self._registry = registry
        self._limits = limits
        self._observer = observer
        self._tracing = tracing
        self._budget = budget

    # -- inference ---------------------------------------------------------------------------

    async def infer(
        self,
        decode: Callable[[], InferenceRequest],
        encode: Callable[[InferenceResponse], Reply],
        *,
        protocol: str,
        model: str,
        request_id: str,
        time_remaining: float | None,
    ) -> Reply:
        """Decode, resolve, validate and run one request, then encode its answer: the whole
        path every frontend shares.

        `decode` and `encode` are the frontend's translations, called here so that the
        request's accounting covers them: a request its protocol refuses is counted too, and
        the `encode` span ends when the reply is built. `model` and `request_id` are the
        message's own, for the metrics and the span of a request that does not decode.
        `time_remaining` is the call's gRPC deadline, in seconds from now.
        """
        accounting = Accounting(self._observer, self._registry, protocol, model, time_remaining)
        try:
            with accounting:
                started = accounting.started
                request = decode()
                if not request.model:
                    raise InvalidInput("model: the model name is empty")
                target = self._registry.resolve(request.model, request.version)
                accounting.version = target.version
                if heavy(request.inputs):
                    inputs = await asyncio.to_thread(
                        decode_inputs, request.model, target.signature, request.inputs, self._limits
                    )
                else:
                    inputs = decode_inputs(
                        request.model, target.signature, request.inputs, self._limits
                    )
                validated = self._validated(request, target, inputs, time_remaining)
                decoded = time.perf_counter()
                if target.memory is None:
                    result = await target.infer(validated)
                else:
                    result = await self._infer_within_memory(
                        target, target.memory, validated, request.inputs
                    )
                executed = time.perf_counter()
                with self._tracing.encode_span():
                    if _heavy_outputs(result):
                        response = await asyncio.to_thread(_response, request.id, result)
                    else:
                        response = _response(request.id, result)
                    reply = encode(response)
                done = time.perf_counter()
                target.statistics.request_served(decoded - started, done - executed, done - started)
                return reply
        finally:
            self._tracing.annotate(model, accounting.version, request_id)

    async def _infer_within_memory(
        self,
        target: LoadedVersion,
        memory: RequestMemory,
        request: InferRequest,
        tensors: Sequence[WireTensor],
    ) -> InferResult:
        """`target.infer`, the request charged its estimated memory meanwhile: a multiple of
        its inputs' wire bytes (typed contents counted at 8 bytes an element)."""
        input_bytes = sum(
            len(t.contents) if isinstance(t.contents, bytes) else 8 * t.contents.count
            for t in tensors
        )
        charged = memory.acquire(input_bytes, self._budget)
        try:
            return await target.infer(request)
        finally:
            memory.release(charged, self._budget)

    def _validated(
        self,
        request: InferenceRequest,
        target: LoadedVersion,
        inputs: dict[str, Array],
        time_remaining: float | None,
    ) -> InferRequest:
        """The core's request, its `inputs` decoded (`decode_inputs`) for `target`."""
        return InferRequest(
            model=request.model,
            inputs=inputs,
            outputs=check_outputs(request.model, target.signature, request.outputs),
            version=target.version,
            id=request.id,
            priority=request.priority,
            deadline=absolute_deadline(time_remaining, request.timeout_us, target.default_timeout),
            trace_context=self._tracing.context(),
        )

    # -- models ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The server takes requests (false while it drains)."""
        return self._registry.accepting

    def model(self, name: str, version: int | None) -> LoadedVersion:
        """The READY version a request for (name, version) goes to; ModelNotFound if none."""
        return self._registry.resolve(name, version)

    def model_ready(self, name: str, version: int | None) -> bool:
        """Whether a request for (name, version) would find a READY version: not ready, rather
        than an error, for an unknown model or version."""
        try:
            self._registry.resolve(name, version)
        except InferdError:
            return False
        return True

    def model_names(self) -> list[str]:
        return self._registry.model_names()

    def versions(self, name: str, version: int | None = None) -> list[ModelVersion]:
        """Every version of the model, any state, ascending; only `version` when one is named.
        ModelNotFound for an unknown model, or a version the server does not know."""
        versions = self._registry.versions(name)
        if version is None:
            return versions
        versions = [v for v in versions if v.version == version]
        if not versions:
            raise ModelNotFound(f"model '{name}' has no version {version}")
        return versions

    def every_version(self, ready_only: bool) -> list[ModelVersion]:
        """Every version of every model, by name then version; only READY ones if asked."""
        return [
            v
            for name in self._registry.model_names()
            for v in self._registry.versions(name)
            if v.state is ModelState.READY or not ready_only
        ]

    def loaded_versions(self, name: str, version: int | None) -> list[ModelVersion]:
        """Every loaded version of the model named (of every model when `name` is empty), or
        the one `version`; versions that never loaded have no statistics, as in Triton."""
        names = [name] if name else self._registry.model_names()
        versions = [
            v
            for n in names
            for v in self._registry.versions(n)
            if v.loaded is not None and (version is None or v.version == version)
        ]
        if name and version is not None and not versions:
            raise ModelNotFound(f"model '{name}' has no loaded version {version}")
        return versions

    def watch(self, model: str) -> AsyncIterator[ModelStatusEvent]:
        """The state of every version of `model` (every model when empty), then each change.
        Ends with OverflowError if the watcher falls too far behind."""
        return self._registry.watch(model)


def _heavy_outputs(result: InferResult) -> bool:
    """Whether encoding `result` would hold the event loop (BYTES outputs are packed element
    by element; fixed-size ones are one copy, whatever their size)."""
    return any(
        array.dtype.kind in "OSU" and array.size > HEAVY_ELEMENTS
        for array in result.outputs.values()
    )


def _response(request_id: str, result: InferResult) -> InferenceResponse:
    outputs = []
    for name, array in result.outputs.items():
        datatype, shape, contents = to_wire(array)
        outputs.append(WireTensor(name, datatype, shape, contents))
    return InferenceResponse(result.model, result.version, request_id, tuple(outputs))
