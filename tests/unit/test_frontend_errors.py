"""Where the frontends turn errors into gRPC statuses (`inferd.api.status`), the control-token
check (`inferd.api.control_auth`), and the data plane's request path with a fake registry: no
server, no gRPC channel, no ONNX Runtime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest

from inferd.api import status
from inferd.api.control_auth import ControlAuth, requires_control_token
from inferd.api.dataplane import DataPlane, InferenceRequest, InferenceResponse
from inferd.api.inference import Limits, WireTensor
from inferd.api.status import Unimplemented, abort_on_error, grpc_status
from inferd.core import errors
from inferd.core.observer import Observer
from inferd.core.statistics import VersionStatistics
from inferd.core.types import InferRequest, InferResult, ModelSignature, TensorSpec
from inferd.observability.tracing import RequestTracing


class Aborted(Exception):
    """What grpc.aio's context.abort raises (AbortError), here with the status it carries."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), cancelled: bool = False) -> None:
        self.metadata = metadata
        self._cancelled = cancelled

    def cancelled(self) -> bool:
        return self._cancelled

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Aborted(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None


# --- grpc_status ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (errors.InvalidInput("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.QueueFull("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded("m"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("m"), grpc.StatusCode.CANCELLED),
        (errors.Unavailable("m"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("m"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("m"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.FailedPrecondition("m"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.InferenceFailed("m"), grpc.StatusCode.INTERNAL),
        (errors.InferdError("m"), grpc.StatusCode.INTERNAL),
        (Unimplemented("m"), grpc.StatusCode.UNIMPLEMENTED),
        (OverflowError("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_each_answered_error_has_one_status_with_its_message(
    error: Exception, code: grpc.StatusCode
) -> None:
    assert grpc_status(error) == (code, "m")


def test_subclass_of_a_core_error_gets_its_parents_status() -> None:
    class Stale(errors.ModelNotFound):
        pass

    assert grpc_status(Stale("gone")) == (grpc.StatusCode.NOT_FOUND, "gone")


# --- abort_on_error ---------------------------------------------------------------------------


class Servicer:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.closed = False

    @abort_on_error
    async def Unary(self, request: int, context: FakeContext) -> int:
        if self.error is not None:
            raise self.error
        return request + 1

    @abort_on_error
    async def Stream(self, request: int, context: FakeContext) -> AsyncIterator[int]:
        try:
            yield request
            yield request + 1
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


async def test_unary_method_answers_normally_without_an_error() -> None:
    assert await Servicer(None).Unary(1, FakeContext()) == 2


async def test_unary_method_error_aborts_with_its_status() -> None:
    with pytest.raises(Aborted) as info:
        await Servicer(errors.QueueFull("queue of 'm' is full")).Unary(1, FakeContext())
    assert (info.value.code, info.value.details) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queue of 'm' is full",
    )


async def test_error_whose_caller_left_ends_quietly_and_is_counted() -> None:
    before = status.unanswered.count
    with pytest.raises(asyncio.CancelledError):
        await Servicer(errors.QueueFull("queue of 'm' is full")).Unary(
            1, FakeContext(cancelled=True)
        )
    assert status.unanswered.count == before + 1


def test_status_message_is_clipped_to_fit_the_trailers() -> None:
    code, message = status.grpc_status(errors.InvalidInput("x" * 100_000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) <= status.MAX_MESSAGE and message.endswith("(100000 characters)")


async def test_unmapped_error_escapes_unchanged_for_grpc_to_answer() -> None:
    with pytest.raises(KeyError):
        await Servicer(KeyError("bug")).Unary(1, FakeContext())


async def test_stream_error_aborts_after_the_responses_already_sent() -> None:
    servicer = Servicer(OverflowError("status watcher fell more than 1024 events behind"))
    sent: list[int] = []
    with pytest.raises(Aborted) as info:
        async for response in servicer.Stream(5, FakeContext()):
            sent.append(response)
    assert sent == [5, 6]
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "fell more than 1024 events behind" in info.value.details


async def test_closing_a_wrapped_stream_closes_the_method_at_once() -> None:
    servicer = Servicer(None)
    stream = servicer.Stream(1, FakeContext())
    assert await anext(stream) == 1
    await stream.aclose()
    assert servicer.closed


def test_decorated_methods_keep_their_kind_for_grpc() -> None:
    import inspect

    assert inspect.iscoroutinefunction(Servicer.Unary)
    assert inspect.isasyncgenfunction(Servicer.Stream)
    assert Servicer.Unary.__name__ == "Unary"


# --- requires_control_token -------------------------------------------------------------------


class ControlServicer:
    def __init__(self, token: str | None) -> None:
        self.control_auth = ControlAuth(token)
        self.calls = 0

    @abort_on_error
    @requires_control_token
    async def Load(self, request: str, context: FakeContext) -> str:
        self.calls += 1
        return f"loaded {request}"


@pytest.mark.parametrize(
    ("token", "metadata", "code", "details"),
    [
        (
            None,
            (("authorization", "Bearer s3cret"),),
            grpc.StatusCode.FAILED_PRECONDITION,
            "control RPCs are disabled; set control_token in the server's configuration",
        ),
        (
            "s3cret",
            (),
            grpc.StatusCode.UNAUTHENTICATED,
            "metadata 'authorization: Bearer <token>' is missing",
        ),
        (
            "s3cret",
            (("authorization", "Basic s3cret"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "metadata 'authorization' must be 'Bearer <token>'",
        ),
        (
            "s3cret",
            (("authorization", "Bearer guess"),),
            grpc.StatusCode.PERMISSION_DENIED,
            "the bearer token does not grant control RPCs",
        ),
    ],
)
async def test_control_rpc_without_the_token_is_refused_before_it_runs(
    token: str | None, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode, details: str
) -> None:
    servicer = ControlServicer(token)
    with pytest.raises(Aborted) as info:
        await servicer.Load("m", FakeContext(metadata))
    assert (info.value.code, info.value.details) == (code, details)
    assert servicer.calls == 0


async def test_control_rpc_with_the_token_runs() -> None:
    servicer = ControlServicer("s3cret")
    context = FakeContext((("Authorization", "bearer s3cret"),))
    assert await servicer.Load("m", context) == "loaded m"
    assert servicer.calls == 1


# --- the data plane, with a fake registry -----------------------------------------------------

SIGNATURE = ModelSignature(
    inputs=(TensorSpec("x", "INT32", (2,)),),
    outputs=(TensorSpec("y", "INT32", (2,)),),
    max_batch_size=4,
)


@dataclass
class FakeVersion:
    name: str
    version: int
    signature: ModelSignature = SIGNATURE
    default_timeout: float | None = None
    received: list[InferRequest] = field(default_factory=list)
    statistics: VersionStatistics = field(default_factory=VersionStatistics)
    memory: None = None

    async def infer(self, request: InferRequest) -> InferResult:
        self.received.append(request)
        y = request.inputs["x"] * 2
        return InferResult(self.name, self.version, {"y": y}, 0.0, 0.0, 1)


class FakeRegistry:
    def __init__(self, *versions: FakeVersion) -> None:
        self.versions_ = {v.name: v for v in versions}
        self.accepting = True

    def resolve(self, name: str, version: int | None = None) -> FakeVersion:
        found = self.versions_.get(name)
        if found is None or version not in (None, found.version):
            raise errors.ModelNotFound(f"model '{name}' is not served")
        return found

    def knows(self, name: str) -> bool:
        return name in self.versions_


class Finished(Observer):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int | None, str]] = []

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        self.requests.append((protocol, model, version, code))


def dataplane(registry: FakeRegistry, observer: Observer) -> DataPlane:
    registry_: Any = registry  # duck-typed: only what the data plane asks of a registry
    return DataPlane(registry_, Limits(max_elements=100), observer, RequestTracing(None))


def request(model: str = "m", **kw: Any) -> InferenceRequest:
    x = np.array([[1, 2]], dtype="<i4")
    return InferenceRequest(
        model=model,
        version=None,
        inputs=[WireTensor("x", "INT32", [1, 2], x.tobytes())],
        outputs=[],
        **kw,
    )


async def infer(plane: DataPlane, decode: Any, model: str = "m") -> InferenceResponse:
    response: InferenceResponse = await plane.infer(
        decode, lambda r: r, protocol="test", model=model, request_id="r1", time_remaining=None
    )
    return response


async def test_request_is_decoded_validated_run_and_its_outputs_encoded() -> None:
    target = FakeVersion("m", 3, default_timeout=2.0)
    observer = Finished()
    plane = dataplane(FakeRegistry(target), observer)
    now = asyncio.get_running_loop().time()
    response = await infer(plane, lambda: request(id="r1", priority=5))
    assert response == InferenceResponse(
        "m", 3, "r1", (WireTensor("y", "INT32", [1, 2], np.array([[2, 4]], "<i4").tobytes()),)
    )
    (sent,) = target.received
    assert (sent.model, sent.version, sent.id, sent.priority) == ("m", 3, "r1", 5)
    assert sent.deadline is not None and now + 2.0 <= sent.deadline <= now + 2.1
    assert observer.requests == [("test", "m", 3, "OK")]
    # Its frontend stages are counted once; the handler's time holds both.
    stats = target.statistics
    assert stats.decode.count == stats.encode.count == stats.handler.count == 1
    assert 0 < stats.decode.ns + stats.encode.ns <= stats.handler.ns


async def test_request_its_protocol_cannot_decode_is_still_counted() -> None:
    observer = Finished()
    plane = dataplane(FakeRegistry(FakeVersion("m", 1)), observer)

    def decode() -> InferenceRequest:
        raise errors.InvalidInput("parameter 'priority' must be an integer")

    with pytest.raises(errors.InvalidInput):
        await infer(plane, decode)
    assert observer.requests == [("test", "m", None, "INVALID_ARGUMENT")]


async def test_empty_model_name_is_invalid_and_unknown_names_get_no_metric_label() -> None:
    observer = Finished()
    plane = dataplane(FakeRegistry(FakeVersion("m", 1)), observer)
    with pytest.raises(errors.InvalidInput, match="model: the model name is empty"):
        await infer(plane, lambda: request(""), model="")
    with pytest.raises(errors.ModelNotFound):
        await infer(plane, lambda: request("ghost"), model="ghost")
    assert observer.requests == [
        ("test", "", None, "INVALID_ARGUMENT"),
        ("test", "", None, "NOT_FOUND"),
    ]


async def test_invalid_input_is_refused_before_the_model_runs() -> None:
    target = FakeVersion("m", 1)
    observer = Finished()
    plane = dataplane(FakeRegistry(target), observer)
    bad = InferenceRequest("m", None, [WireTensor("x", "INT32", [1, 3], bytes(12))], [])
    with pytest.raises(errors.InvalidInput, match="dim 1 is 3"):
        await infer(plane, lambda: bad)
    assert target.received == []
    assert observer.requests == [("test", "m", 1, "INVALID_ARGUMENT")]


def test_model_ready_is_false_rather_than_an_error_for_an_unknown_model() -> None:
    plane = dataplane(FakeRegistry(FakeVersion("m", 2)), Finished())
    assert plane.model_ready("m", None) and plane.model_ready("m", 2)
    assert not plane.model_ready("m", 3)
    assert not plane.model_ready("ghost", None)
