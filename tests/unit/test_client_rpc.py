"""InferClient and AsyncInferClient over real gRPC (loopback) against an in-test fake server;
every case runs with one connection and with three (`connections=3`, calls in turn)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.protobuf import timestamp_pb2

from inferd_client import (
    AsyncInferClient,
    DeadlineExceededError,
    InferClient,
    InferError,
    InvalidInputError,
    ModelNotFoundError,
    RequestCancelledError,
    ServerBusyError,
    StreamRequest,
    StreamResult,
    UnauthenticatedError,
    UnavailableError,
)
from inferd_wire.proto.inferd.v1 import (
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    tensor_pb2,
)

# --- the fake server -------------------------------------------------------------------------

_STAMP = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=500_000_000)
_STAMP_TIME = datetime(2023, 11, 14, 22, 13, 20, 500_000, tzinfo=UTC)


def _echo(request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Every input back as an output of the same name (only `outputs`, when given)."""
    wanted = set(request.outputs)
    return predict_pb2.PredictResponse(
        model=request.model,
        version=request.version if request.HasField("version") else 1,
        id=request.id,
        outputs=[t for t in request.inputs if not wanted or t.name in wanted],
    )


@dataclass
class Fake:
    """What the fake server saw, for the tests to check."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    # The client address and port of each Predict: one per connection.
    peers: list[str] = field(default_factory=list)
    watch_cancelled: threading.Event = field(default_factory=threading.Event)


class FakePredict(predict_pb2_grpc.PredictServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        self.fake.metadata.append(dict(context.invocation_metadata()))
        self.fake.peers.append(context.peer())
        if request.model == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "input 'x' must be FP32")
        if request.model.startswith("code:"):
            name = request.model.removeprefix("code:")
            context.abort(getattr(grpc.StatusCode, name), f"fake {name}")
        if request.model == "slow":
            time.sleep(1.0)
        if request.model == "corrupt":
            bad = tensor_pb2.Tensor(name="y", datatype="FP32", shape=[4], contents=b"abc")
            return predict_pb2.PredictResponse(model="corrupt", outputs=[bad])
        return _echo(request)

    def PredictStream(
        self, request_iterator: Iterator[predict_pb2.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[predict_pb2.PredictStreamResponse]:
        later: list[predict_pb2.PredictRequest] = []
        for request in request_iterator:
            if request.model == "bad":
                status = predict_pb2.RequestStatus(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="bad inputs"
                )
                yield predict_pb2.PredictStreamResponse(id=request.id, error=status)
            elif request.model == "abort":
                context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down")
            elif request.model == "later":  # answered after everything else
                later.append(request)
            else:
                yield predict_pb2.PredictStreamResponse(id=request.id, response=_echo(request))
        for request in reversed(later):
            yield predict_pb2.PredictStreamResponse(id=request.id, response=_echo(request))


def _version(number: int, state: int, reason: str = "") -> model_status_pb2.VersionStatus:
    return model_status_pb2.VersionStatus(
        version=number,
        state=state,
        reason=reason,
        last_change=_STAMP,
        statistics=model_status_pb2.VersionStatistics(
            request_success=10 * number,
            request_failure=number,
            inference_count=40,
            execution_count=12,
            queue_ns=1_000,
            compute_ns=2**40,
            batch_sizes={1: 8, 4: 4},
            stages=model_status_pb2.RequestStages(count=10, decode_ns=5, handler_ns=2**41),
        ),
    )


_VERSIONS = [
    _version(1, model_status_pb2.MODEL_STATE_READY),
    _version(2, model_status_pb2.MODEL_STATE_FAILED, "bad model file"),
]


class FakeStatus(model_status_pb2_grpc.ModelStatusServicer):
    def __init__(self, fake: Fake) -> None:
        self.fake = fake

    def GetModelStatus(
        self, request: model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> model_status_pb2.GetModelStatusResponse:
        if request.model != "m":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        versions = [
            v for v in _VERSIONS if not request.HasField("version") or v.version == request.version
        ]
        return model_status_pb2.GetModelStatusResponse(model="m", versions=versions)

    def ListModels(
        self, request: model_status_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> model_status_pb2.ListModelsResponse:
        return model_status_pb2.ListModelsResponse(
            models=[
                model_status_pb2.ModelSummary(name="m", versions=_VERSIONS),
                model_status_pb2.ModelSummary(name="empty"),
            ]
        )

    def GetModelMetadata(
        self, request: model_status_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> model_status_pb2.ModelMetadata:
        if request.model != "m":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return model_status_pb2.ModelMetadata(
            name="m",
            version=request.version if request.HasField("version") else 1,
            versions=[1, 3],
            platform="onnxruntime",
            inputs=[tensor_pb2.TensorMetadata(name="x", datatype="FP32", shape=[-1, 3])],
            outputs=[tensor_pb2.TensorMetadata(name="y", datatype="INT64", shape=[-1])],
            max_batch_size=8,
            batching=model_status_pb2.BatchingSettings(
                max_batch_size=8,
                max_queue_delay_us=500,
                preferred_batch_sizes=[4, 8],
                max_queue_size=64,
                instances=2,
                default_timeout_us=1_000_000,
            ),
            execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )

    def WatchModelStatus(
        self, request: model_status_pb2.WatchModelStatusRequest, context: grpc.ServicerContext
    ) -> Iterator[model_status_pb2.ModelStatusEvent]:
        context.add_callback(self.fake.watch_cancelled.set)
        model = request.model or "m"
        yield model_status_pb2.ModelStatusEvent(
            model=model, version=1, state=model_status_pb2.MODEL_STATE_LOADING, time=_STAMP
        )
        yield model_status_pb2.ModelStatusEvent(
            model=model, version=1, state=model_status_pb2.MODEL_STATE_READY, reason="loaded"
        )
        while context.is_active():  # then no news, until the client goes away
            time.sleep(0.01)


def _health_check(request: bytes, context: grpc.ServicerContext) -> bytes:
    # Raw bytes both ways: HealthCheckRequest{service} in, HealthCheckResponse{status} out.
    if request == b"":
        return b"\x08\x01"  # SERVING
    if request == b"\x0a\x04down":
        return b"\x08\x02"  # NOT_SERVING
    context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
    raise AssertionError("unreachable")


@dataclass
class Server:
    target: str
    fake: Fake


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    fake = Fake()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    predict_pb2_grpc.add_PredictServicer_to_server(FakePredict(fake), grpc_server)
    model_status_pb2_grpc.add_ModelStatusServicer_to_server(FakeStatus(fake), grpc_server)
    grpc_server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "grpc.health.v1.Health",
                {"Check": grpc.unary_unary_rpc_method_handler(_health_check)},
            )
        ]
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield Server(f"127.0.0.1:{port}", fake)
    finally:
        grpc_server.stop(None)


@pytest.fixture(params=[1, 3], ids=lambda n: f"connections={n}")
def client(server: Server, request: pytest.FixtureRequest) -> Iterator[InferClient]:
    with InferClient(server.target, connections=request.param) as c:
        yield c


@pytest.fixture(params=[1, 3], ids=lambda n: f"connections={n}")
async def aclient(
    server: Server, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncInferClient]:
    async with AsyncInferClient(server.target, connections=request.param) as c:
        yield c


# --- shared cases ----------------------------------------------------------------------------

_rng = np.random.default_rng(7)

ARRAYS: dict[str, np.ndarray] = {
    "fp32": np.concatenate(
        [
            _rng.standard_normal(13).astype(np.float32),
            np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38], dtype=np.float32),
        ]
    ).reshape(1, 19),
    "int64": np.array([[np.iinfo(np.int64).min, -1, 0], [1, 2**40, np.iinfo(np.int64).max]]),
    "fp16": np.array([0.1, -65504, np.inf, np.nan, 6e-8], dtype=np.float16),
    "bool": np.array([[True, False], [False, True], [True, True]]),
    "bytes": np.array([b"", b"\x00\xff", "ünï".encode(), b"x" * 300], dtype=object).reshape(2, 2),
    "bf16": np.array([1.0, -3.5, 1e30], dtype=ml_dtypes.bfloat16),
    "uint8": np.arange(256, dtype=np.uint8).reshape(16, 16),
    "empty": np.zeros((0, 5), dtype=np.float32),
    "scalar": np.array(2.5, dtype=np.float64),
    "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T,  # not contiguous
}


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype, shape and every bit (NaNs included)."""
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert got.tolist() == want.tolist()
    else:
        assert got.dtype == want.dtype.newbyteorder("<")
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()


ERROR_CASES: list[tuple[str, grpc.StatusCode, type[InferError]]] = [
    ("NOT_FOUND", grpc.StatusCode.NOT_FOUND, ModelNotFoundError),
    ("RESOURCE_EXHAUSTED", grpc.StatusCode.RESOURCE_EXHAUSTED, ServerBusyError),
    ("UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, UnavailableError),
    ("UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    ("CANCELLED", grpc.StatusCode.CANCELLED, RequestCancelledError),
    ("INTERNAL", grpc.StatusCode.INTERNAL, InferError),
    ("FAILED_PRECONDITION", grpc.StatusCode.FAILED_PRECONDITION, InferError),
]


def mixed_requests() -> list[StreamRequest]:
    x = np.arange(4, dtype=np.float32)
    return [
        StreamRequest("m", {"x": x}, request_id="r0"),
        StreamRequest("bad", {"x": x}, request_id="r1", version=3),
        StreamRequest("later", {"x": x * 2}, request_id="r2"),
        StreamRequest("m", {"x": x + 1, "y": x}, outputs=["y"], request_id="r3", version=2),
        StreamRequest("bad", {"x": x}, request_id="r4"),
        StreamRequest("m", {"s": np.array(["a", "b"])}, request_id="r5"),
    ]


def check_mixed(results: list[StreamResult]) -> None:
    x = np.arange(4, dtype=np.float32)
    assert [r.request_id for r in results] == ["r0", "r1", "r3", "r4", "r5", "r2"]
    by_id = {r.request_id: r for r in results}
    for rid, version in [("r1", 3), ("r4", None)]:
        bad = by_id[rid]
        assert not bad.ok and bad.outputs is None
        assert isinstance(bad.error, InvalidInputError)
        assert bad.error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert bad.error.details == "bad inputs"
        assert (bad.model, bad.version) == ("bad", version)
    good = by_id["r0"]
    assert good.ok and good.error is None and good.outputs is not None
    assert (good.model, good.version) == ("m", 1)
    assert_same(good.outputs["x"], x)
    assert by_id["r3"].outputs is not None and list(by_id["r3"].outputs) == ["y"]
    assert by_id["r3"].version == 2
    assert by_id["r2"].outputs is not None and by_id["r2"].model == "later"
    assert_same(by_id["r2"].outputs["x"], x * 2)
    assert by_id["r5"].outputs is not None and by_id["r5"].outputs["s"].tolist() == [b"a", b"b"]


def check_statuses(statuses: list[Any]) -> None:
    ready, failed = statuses
    assert (ready.version, ready.state, ready.reason) == (1, "READY", "")
    assert (failed.version, failed.state, failed.reason) == (2, "FAILED", "bad model file")
    assert ready.last_change == _STAMP_TIME
    assert ready.statistics == {
        "request_success": 10,
        "request_failure": 1,
        "inference_count": 40,
        "execution_count": 12,
        "queue_ns": 1_000,
        "compute_ns": 2**40,
        "batch_sizes": {1: 8, 4: 4},
        "stages": {
            "count": 10,
            "decode_ns": 5,
            "queue_ns": 0,
            "assemble_ns": 0,
            "handoff_ns": 0,
            "infer_ns": 0,
            "split_ns": 0,
            "encode_ns": 0,
            "handler_ns": 2**41,
        },
    }


def check_metadata(metadata: Any) -> None:
    assert (metadata.name, metadata.version, metadata.versions) == ("m", 3, (1, 3))
    assert metadata.platform == "onnxruntime"
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("x", "FP32", (-1, 3))]
    assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [("y", "INT64", (-1,))]
    assert metadata.max_batch_size == 8
    assert metadata.batching == {
        "max_batch_size": 8,
        "max_queue_delay_us": 500,
        "preferred_batch_sizes": [4, 8],
        "max_queue_size": 64,
        "instances": 2,
        "default_timeout_us": 1_000_000,
    }
    assert metadata.execution_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class Boom(Exception):
    pass


# --- the blocking client ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARRAYS))
def test_round_trip_exact(client: InferClient, name: str) -> None:
    out = client.infer("m", {name: ARRAYS[name]})
    assert list(out) == [name]
    assert_same(out[name], ARRAYS[name])


def test_round_trip_many_inputs_and_output_selection(client: InferClient) -> None:
    out = client.infer("m", ARRAYS, request_id="abc", version=4, priority=1)
    assert list(out) == list(ARRAYS)
    for name, array in ARRAYS.items():
        assert_same(out[name], array)
    assert list(client.infer("m", ARRAYS, outputs=["bool", "fp16"])) == ["fp16", "bool"]
    assert list(client.infer("m", ARRAYS, outputs="int64")) == ["int64"]


def test_str_and_list_inputs(client: InferClient) -> None:
    out = client.infer("m", {"s": np.array(["héllo", ""]), "l": [[1.0, 2.0]]})
    assert out["s"].tolist() == ["héllo".encode(), b""]
    assert_same(out["l"], np.array([[1.0, 2.0]]))


def test_outputs_are_read_only_views(client: InferClient) -> None:
    out = client.infer("m", {"x": np.zeros(3, np.float32)})
    assert not out["x"].flags.writeable
    assert out["x"].copy().flags.writeable


def test_invalid_argument(client: InferClient) -> None:
    with pytest.raises(InvalidInputError) as info:
        client.infer("bad", {"x": np.zeros(1, np.float32)})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "input 'x' must be FP32"
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize(("name", "code", "cls"), ERROR_CASES)
def test_typed_errors(
    client: InferClient, name: str, code: grpc.StatusCode, cls: type[InferError]
) -> None:
    with pytest.raises(InferError) as info:
        client.infer(f"code:{name}", {})
    assert type(info.value) is cls
    assert info.value.code is code
    assert info.value.details == f"fake {name}"


def test_deadline(client: InferClient) -> None:
    with pytest.raises(DeadlineExceededError) as info:
        client.infer("slow", {}, timeout=0.05)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_malformed_response(client: InferClient) -> None:
    with pytest.raises(InferError) as info:
        client.infer("corrupt", {})
    assert info.value.code is grpc.StatusCode.INTERNAL


def test_unavailable() -> None:
    with InferClient(f"127.0.0.1:{closed_port()}") as c, pytest.raises(UnavailableError):
        c.infer("m", {}, timeout=5)


def test_max_message_bytes(server: Server) -> None:
    with InferClient(server.target, max_message_bytes=1024) as c:
        c.infer("m", {"x": np.zeros(100, np.float32)})
        with pytest.raises(ServerBusyError) as info:
            c.infer("m", {"x": np.zeros(1000, np.float32)})
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unsupported_dtype_raises_before_sending(client: InferClient) -> None:
    with pytest.raises(TypeError):
        client.infer("m", {"x": np.zeros(2, dtype=np.complex64)})


def test_stream_mixed(client: InferClient) -> None:
    check_mixed(list(client.infer_stream(mixed_requests())))


def test_stream_lazy_generator(client: InferClient) -> None:
    def gen() -> Iterator[StreamRequest]:
        for i in range(50):
            yield StreamRequest("m", {"i": np.array([i])}, request_id=str(i))

    results = list(client.infer_stream(gen()))
    assert [int(r.outputs["i"][0]) for r in results if r.outputs is not None] == list(range(50))


def test_stream_empty(client: InferClient) -> None:
    assert list(client.infer_stream([])) == []


def test_stream_failure_raises_after_earlier_results(client: InferClient) -> None:
    x = np.zeros(1, np.float32)
    requests = [StreamRequest("m", {"x": x}, request_id="a"), StreamRequest("abort", {"x": x})]
    results: list[StreamResult] = []
    with pytest.raises(UnavailableError) as info:
        for result in client.infer_stream(requests):
            results.append(result)
    assert info.value.details == "shutting down"
    assert [r.request_id for r in results] == ["a"]


def test_stream_request_iterator_exception_propagates(client: InferClient) -> None:
    def gen() -> Iterator[StreamRequest]:
        yield StreamRequest("m", {"x": np.zeros(1)}, request_id="a")
        raise Boom("from the caller's iterator")

    with pytest.raises(Boom, match="caller's iterator"):
        list(client.infer_stream(gen()))
    with pytest.raises(TypeError):  # a request that cannot be converted
        list(client.infer_stream([StreamRequest("m", {"x": np.zeros(1, np.complex64)})]))


def test_status(client: InferClient) -> None:
    check_statuses(client.status("m"))
    (only,) = client.status("m", version=2)
    assert only.state == "FAILED"
    with pytest.raises(ModelNotFoundError):
        client.status("nope")


def test_list_models(client: InferClient) -> None:
    models = client.list_models(timeout=5)
    assert list(models) == ["m", "empty"]
    check_statuses(models["m"])
    assert models["empty"] == []


def test_metadata(client: InferClient) -> None:
    check_metadata(client.metadata("m", version=3))
    assert client.metadata("m").version == 1
    with pytest.raises(ModelNotFoundError):
        client.metadata("nope")


def test_watch_and_cancel_on_close(client: InferClient, server: Server) -> None:
    server.fake.watch_cancelled.clear()
    events = client.watch("w")
    first, second = next(events), next(events)
    assert (first.model, first.version, first.state, first.time) == ("w", 1, "LOADING", _STAMP_TIME)
    assert (second.state, second.reason, second.time) == ("READY", "loaded", None)
    events.close()  # type: ignore[attr-defined]
    assert server.fake.watch_cancelled.wait(5)


def test_health(client: InferClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("down") == "NOT_SERVING"
    assert client.health("nope") == "SERVICE_UNKNOWN"
    with InferClient(f"127.0.0.1:{closed_port()}") as c, pytest.raises(UnavailableError):
        c.health(timeout=5)


def test_traceparent_only_with_active_span(client: InferClient, server: Server) -> None:
    trace = pytest.importorskip("opentelemetry.sdk.trace")
    tracer = trace.TracerProvider().get_tracer("test")
    server.fake.metadata.clear()
    client.infer("m", {})
    with tracer.start_as_current_span("call") as span:
        client.infer("m", {})
    without, with_span = server.fake.metadata
    assert "traceparent" not in without
    version, trace_id, span_id, _flags = with_span["traceparent"].split("-")
    context = span.get_span_context()
    assert (version, int(trace_id, 16), int(span_id, 16)) == (
        "00",
        context.trace_id,
        context.span_id,
    )


# --- the asyncio client ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARRAYS))
async def test_async_round_trip_exact(aclient: AsyncInferClient, name: str) -> None:
    out = await aclient.infer("m", {name: ARRAYS[name]})
    assert_same(out[name], ARRAYS[name])


async def test_async_concurrent_infers(aclient: AsyncInferClient) -> None:
    outs = await asyncio.gather(
        *(aclient.infer("m", {"i": np.array([i])}, request_id=str(i)) for i in range(20))
    )
    assert [int(o["i"][0]) for o in outs] == list(range(20))


async def test_async_invalid_argument(aclient: AsyncInferClient) -> None:
    with pytest.raises(InvalidInputError) as info:
        await aclient.infer("bad", {"x": np.zeros(1, np.float32)})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "input 'x' must be FP32"


@pytest.mark.parametrize(("name", "code", "cls"), ERROR_CASES)
async def test_async_typed_errors(
    aclient: AsyncInferClient, name: str, code: grpc.StatusCode, cls: type[InferError]
) -> None:
    with pytest.raises(InferError) as info:
        await aclient.infer(f"code:{name}", {})
    assert type(info.value) is cls and info.value.code is code


async def test_async_deadline(aclient: AsyncInferClient) -> None:
    with pytest.raises(DeadlineExceededError):
        await aclient.infer("slow", {}, timeout=0.05)


async def test_async_unavailable() -> None:
    async with AsyncInferClient(f"127.0.0.1:{closed_port()}") as c:
        with pytest.raises(UnavailableError):
            await c.infer("m", {}, timeout=5)
        with pytest.raises(UnavailableError):
            await c.health(timeout=5)


async def test_async_stream_mixed_sync_iterable(aclient: AsyncInferClient) -> None:
    check_mixed([r async for r in aclient.infer_stream(mixed_requests())])


async def test_async_stream_mixed_async_iterable(aclient: AsyncInferClient) -> None:
    async def gen() -> AsyncIterator[StreamRequest]:
        for request in mixed_requests():
            await asyncio.sleep(0)
            yield request

    check_mixed([r async for r in aclient.infer_stream(gen())])


async def test_async_stream_failure(aclient: AsyncInferClient) -> None:
    x = np.zeros(1, np.float32)
    requests = [StreamRequest("m", {"x": x}, request_id="a"), StreamRequest("abort", {"x": x})]
    results: list[StreamResult] = []
    with pytest.raises(UnavailableError):
        async for result in aclient.infer_stream(requests):
            results.append(result)
    assert [r.request_id for r in results] == ["a"]


async def test_async_stream_request_iterator_exception_propagates(
    aclient: AsyncInferClient,
) -> None:
    async def gen() -> AsyncIterator[StreamRequest]:
        yield StreamRequest("m", {"x": np.zeros(1)}, request_id="a")
        raise Boom("from the caller's iterator")

    with pytest.raises(Boom, match="caller's iterator"):
        _ = [r async for r in aclient.infer_stream(gen())]


async def test_async_status_metadata_list(aclient: AsyncInferClient) -> None:
    check_statuses(await aclient.status("m"))
    check_metadata(await aclient.metadata("m", 3))
    models = await aclient.list_models()
    assert list(models) == ["m", "empty"]
    with pytest.raises(ModelNotFoundError):
        await aclient.status("nope")


async def test_async_watch_and_cancel_on_close(aclient: AsyncInferClient, server: Server) -> None:
    server.fake.watch_cancelled.clear()
    events: list[Any] = []
    async with contextlib.aclosing(aclient.watch()) as stream:  # type: ignore[type-var]
        async for event in stream:
            events.append(event)
            if len(events) == 2:
                break
    assert [(e.model, e.state) for e in events] == [("m", "LOADING"), ("m", "READY")]
    assert await asyncio.to_thread(server.fake.watch_cancelled.wait, 5)


async def test_async_health(aclient: AsyncInferClient) -> None:
    assert await aclient.health() == "SERVING"
    assert await aclient.health("down") == "NOT_SERVING"
    assert await aclient.health("nope") == "SERVICE_UNKNOWN"


async def test_async_traceparent(aclient: AsyncInferClient, server: Server) -> None:
    trace = pytest.importorskip("opentelemetry.sdk.trace")
    tracer = trace.TracerProvider().get_tracer("test")
    server.fake.metadata.clear()
    with tracer.start_as_current_span("call") as span:
        await aclient.infer("m", {})
    (seen,) = server.fake.metadata
    assert f"{span.get_span_context().trace_id:032x}" in seen["traceparent"]


# --- several connections ---------------------------------------------------------------------

X = {"x": np.zeros(3, np.float32)}


def test_calls_take_the_connections_in_turn(server: Server) -> None:
    with InferClient(server.target, connections=3) as client:
        start = len(server.fake.peers)
        for _ in range(6):
            client.infer("m", X)
        peers = server.fake.peers[start:]
    assert len(set(peers)) == 3
    assert peers[3:] == peers[:3]


def test_calls_from_many_threads_are_spread_evenly(server: Server) -> None:
    threads, calls = 8, 30
    with InferClient(server.target, connections=3) as client:
        start = len(server.fake.peers)
        with futures.ThreadPoolExecutor(threads) as pool:
            outs = list(
                pool.map(lambda i: client.infer("m", {"i": np.array([i])}), range(threads * calls))
            )
        peers = server.fake.peers[start:]
    assert [int(o["i"][0]) for o in outs] == list(range(threads * calls))
    # Each call takes the next connection, whichever thread makes it.
    assert sorted(Counter(peers).values()) == [threads * calls // 3] * 3


def test_close_closes_every_connection(server: Server) -> None:
    client = InferClient(server.target, connections=3)
    for _ in range(3):
        client.infer("m", X)
    client.close()
    for _ in range(3):
        with pytest.raises(ValueError, match="closed channel"):
            client.infer("m", X)


async def test_async_calls_take_the_connections_in_turn(server: Server) -> None:
    async with AsyncInferClient(server.target, connections=3) as client:
        start = len(server.fake.peers)
        outs = await asyncio.gather(*(client.infer("m", {"i": np.array([i])}) for i in range(30)))
        peers = server.fake.peers[start:]
    assert [int(o["i"][0]) for o in outs] == list(range(30))
    assert sorted(Counter(peers).values()) == [10, 10, 10]


async def test_async_close_closes_every_connection(server: Server) -> None:
    client = AsyncInferClient(server.target, connections=3)
    for _ in range(3):
        await client.infer("m", X)
    await client.close()
    for _ in range(3):
        with pytest.raises(grpc.aio.UsageError, match="closed"):
            await client.infer("m", X)


@pytest.mark.parametrize("connections", [0, -2])
def test_connections_must_be_one_or_more(connections: int) -> None:
    with pytest.raises(ValueError, match="connections"):
        InferClient("127.0.0.1:1", connections=connections)
    with pytest.raises(ValueError, match="connections"):
        AsyncInferClient("127.0.0.1:1", connections=connections)
