"""The client's pieces that need no network: health codec, errors, message conversion."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import ml_dtypes
import numpy as np
import pytest
from google.protobuf import timestamp_pb2

from inferd_client import _convert
from inferd_client._common import StreamBook, channel_options
from inferd_client._health import decode_health_response, encode_health_request
from inferd_client.errors import (
    DeadlineExceededError,
    InferError,
    InvalidInputError,
    ModelNotFoundError,
    RequestCancelledError,
    ServerBusyError,
    UnauthenticatedError,
    UnavailableError,
    error_from_status,
)
from inferd_client.types import StreamRequest
from inferd_wire import codec
from inferd_wire.proto.inferd.v1 import model_status_pb2, predict_pb2, tensor_pb2

# --- health codec ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("", b""),
        ("inferd.v1.Predict", b"\x0a\x11inferd.v1.Predict"),
        ("é", b"\x0a\x02\xc3\xa9"),
        ("x" * 200, b"\x0a\xc8\x01" + b"x" * 200),  # a two-byte length varint
    ],
)
def test_health_request_encoding(service: str, expected: bytes) -> None:
    assert encode_health_request(service) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "UNKNOWN"),  # proto3 omits the default
        (b"\x08\x00", "UNKNOWN"),
        (b"\x08\x01", "SERVING"),
        (b"\x08\x02", "NOT_SERVING"),
        (b"\x08\x03", "SERVICE_UNKNOWN"),
        (b"\x08\x07", "7"),
        (b"\x08\x01\x08\x02", "NOT_SERVING"),  # the last occurrence wins
        (b"\x12\x03abc\x08\x01", "SERVING"),  # an unknown length-delimited field is skipped
        (b"\x19" + bytes(8) + b"\x08\x01\x25" + bytes(4), "SERVING"),  # fixed64 / fixed32
        (b"\x10\x96\x01\x08\x02", "NOT_SERVING"),  # an unknown varint field is skipped
    ],
)
def test_health_response_decoding(data: bytes, expected: str) -> None:
    assert decode_health_response(data) == expected


@pytest.mark.parametrize("data", [b"\x08", b"\x08\x80", b"\x12\x05ab", b"\x0b"])
def test_health_response_malformed(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_health_response(data)


def test_health_codec_matches_protobuf() -> None:
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    for service in ["", "a", "inferd.v1.Predict", "ü" * 100]:
        real = health_pb2.HealthCheckRequest(service=service).SerializeToString()
        assert encode_health_request(service) == real
        assert health_pb2.HealthCheckRequest.FromString(real).service == service
    for number, name in enumerate(["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"]):
        real = health_pb2.HealthCheckResponse(status=number).SerializeToString()
        assert decode_health_response(real) == name


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, ModelNotFoundError),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidInputError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ServerBusyError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
        (grpc.StatusCode.CANCELLED, RequestCancelledError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.INTERNAL, InferError),
        (grpc.StatusCode.PERMISSION_DENIED, InferError),
    ],
)
def test_error_from_status(code: grpc.StatusCode, cls: type[InferError]) -> None:
    error = error_from_status(code.value[0], "why")
    assert type(error) is cls
    assert error.code is code
    assert error.details == "why"
    assert str(error) == f"{code.name}: why"


def test_error_from_unknown_status_number() -> None:
    error = error_from_status(99, "odd")
    assert type(error) is InferError
    assert error.code is grpc.StatusCode.UNKNOWN
    assert "99" in error.details and "odd" in error.details


def test_error_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(InvalidInputError(grpc.StatusCode.INVALID_ARGUMENT, "x")))
    assert type(error) is InvalidInputError
    assert (error.code, error.details) == (grpc.StatusCode.INVALID_ARGUMENT, "x")


# --- conversion ------------------------------------------------------------------------------


def test_predict_request_fields() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = _convert.predict_request(
        "m", {"x": x, "s": ["a", "bc"]}, "y", 3, "id-1", priority=2, timeout_us=500
    )
    assert request.model == "m"
    assert request.HasField("version") and request.version == 3
    assert (request.id, request.priority, request.timeout_us) == ("id-1", 2, 500)
    assert list(request.outputs) == ["y"]  # one name, not its characters
    tx, ts = request.inputs
    assert (tx.name, tx.datatype, list(tx.shape), tx.contents) == ("x", "FP32", [2, 3], x.tobytes())
    assert (ts.name, ts.datatype, list(ts.shape)) == ("s", "BYTES", [2])
    assert ts.contents == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"

    bare = _convert.predict_request("m", {})
    assert not bare.HasField("version")
    assert list(bare.outputs) == [] and bare.priority == 0


def test_decode_outputs_bf16_and_empty() -> None:
    bf = np.array([1.5, -2.0, np.inf], dtype=ml_dtypes.bfloat16)
    response = predict_pb2.PredictResponse(
        outputs=[
            tensor_pb2.Tensor(name="b", datatype="BF16", shape=[3], contents=bf.tobytes()),
            tensor_pb2.Tensor(name="e", datatype="FP32", shape=[0, 4], contents=b""),
        ]
    )
    out = _convert.predict_outputs(response)
    assert out["b"].dtype == ml_dtypes.bfloat16 and out["b"].tobytes() == bf.tobytes()
    assert out["e"].shape == (0, 4)


def test_decode_outputs_malformed_is_internal() -> None:
    response = predict_pb2.PredictResponse(
        outputs=[tensor_pb2.Tensor(name="y", datatype="FP32", shape=[2], contents=b"\x00" * 7)]
    )
    with pytest.raises(InferError) as info:
        _convert.predict_outputs(response)
    assert info.value.code is grpc.StatusCode.INTERNAL and "'y'" in info.value.details


def test_stream_result_kinds() -> None:
    ok = predict_pb2.PredictStreamResponse(
        id="a", response=predict_pb2.PredictResponse(model="m", version=4, id="a")
    )
    result = _convert.stream_result(ok, ("m", None))
    assert result.ok and result.outputs == {} and (result.model, result.version) == ("m", 4)

    failed = predict_pb2.PredictStreamResponse(
        id="b", error=predict_pb2.RequestStatus(code=5, message="no such model")
    )
    result = _convert.stream_result(failed, ("ghost", 2))
    assert not result.ok and result.outputs is None
    assert isinstance(result.error, ModelNotFoundError)
    assert (result.request_id, result.model, result.version) == ("b", "ghost", 2)

    empty = _convert.stream_result(predict_pb2.PredictStreamResponse(id="c"), None)
    assert empty.error is not None and empty.error.code is grpc.StatusCode.INTERNAL
    assert (empty.model, empty.version) == ("", None)


def test_stream_request_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        _convert.stream_request({"model": "m"})  # type: ignore[arg-type]
    message = _convert.stream_request(StreamRequest("m", {"x": np.zeros(1)}, request_id="r"))
    assert message.id == "r" and message.inputs[0].datatype == "FP64"


def _stamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def test_version_status_conversion() -> None:
    message = model_status_pb2.VersionStatus(
        version=2,
        state=model_status_pb2.MODEL_STATE_FAILED,
        reason="bad file",
        last_change=_stamp(1_700_000_000, 250_000_000),
        statistics=model_status_pb2.VersionStatistics(
            request_success=5, compute_ns=2**63 + 1, batch_sizes={8: 2, 1: 3}
        ),
    )
    status = _convert.version_status(message)
    assert (status.version, status.state, status.reason) == (2, "FAILED", "bad file")
    assert status.last_change == datetime(2023, 11, 14, 22, 13, 20, 250_000, tzinfo=UTC)
    assert status.statistics["request_success"] == 5
    assert status.statistics["compute_ns"] == 2**63 + 1  # uint64 stays unsigned
    assert status.statistics["batch_sizes"] == {1: 3, 8: 2}
    assert list(status.statistics["batch_sizes"]) == [1, 8]

    unset = _convert.version_status(model_status_pb2.VersionStatus(state=42))
    assert unset.last_change is None and unset.state == "42"
    assert unset.statistics["batch_sizes"] == {}


def test_metadata_conversion() -> None:
    message = model_status_pb2.ModelMetadata(name="m", version=1, versions=[1])
    metadata = _convert.model_metadata(message)
    assert metadata.batching == {} and metadata.inputs == () and metadata.versions == (1,)


# --- tensor codec (inferd_wire.codec: the one encoder and decoder, client and server) ------


@pytest.mark.parametrize("datatype", [d for d in codec.DTYPES if d != "BYTES"])
def test_every_fixed_size_datatype_round_trips_through_the_wire(datatype: str) -> None:
    array = np.arange(6).astype(codec.DTYPES[datatype]).reshape(2, 3)
    wire = codec.to_wire(array)
    assert wire == (datatype, [2, 3], array.tobytes())
    back = codec.from_wire(*wire)
    assert back.dtype == codec.DTYPES[datatype] and back.tobytes() == array.tobytes()
    assert not back.flags.writeable  # a view of the received bytes


def test_big_endian_array_is_sent_little_endian() -> None:
    array = np.array([1, 256], dtype=">i4")
    datatype, _, contents = codec.to_wire(array)
    assert (datatype, contents) == ("INT32", b"\1\0\0\0\0\1\0\0")


def test_str_and_bytes_arrays_travel_as_bytes_elements_in_row_major_order() -> None:
    array = np.array([["a", "é"], ["", "bc"]])
    datatype, shape, contents = codec.to_wire(array)
    assert (datatype, shape) == ("BYTES", [2, 2])
    assert contents == b"\1\0\0\0a\2\0\0\0\xc3\xa9\0\0\0\0\2\0\0\0bc"
    back = codec.from_wire(datatype, shape, contents)
    assert back.tolist() == [[b"a", "é".encode()], [b"", b"bc"]]


def test_wire_contents_of_a_flat_sequence_match_those_of_an_array() -> None:
    assert codec.wire_contents("INT16", [1, -2]) == np.array([1, -2], "<i2").tobytes()
    assert codec.wire_contents("BYTES", [b"x", "y"]) == b"\1\0\0\0x\1\0\0\0y"


def test_element_count_of_a_scalar_is_one_and_never_overflows() -> None:
    assert codec.element_count([]) == 1
    assert codec.element_count([2, 0, 5]) == 0
    assert codec.element_count([2**40, 2**40]) == 2**80


@pytest.mark.parametrize(
    ("datatype", "shape", "contents", "message"),
    [
        ("FP32", [2], b"\0" * 7, "contents hold 7 bytes; shape [2] of FP32 needs 8"),
        ("FP32", [-1, 2], b"", "shape [-1, 2] has a negative dimension"),
        ("FP128", [1], b"\0" * 16, "unknown datatype 'FP128'; expected one of BOOL, "),
        ("BYTES", [2], b"\1\0\0\0ab\0\0", "BYTES element 1: length prefix runs past the end"),
        ("BYTES", [1], b"\1\0\0\0ab", "1 bytes left over after 1 BYTES elements"),
        ("BYTES", [2**40], b"", "0 bytes cannot hold 1099511627776 BYTES elements"),
        ("INT64", [2**40, 2**40], b"", "needs 9671406556917033397649408"),
    ],
)
def test_from_wire_refuses_contents_that_do_not_match_before_allocating(
    datatype: str, shape: list[int], contents: bytes, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        codec.from_wire(datatype, shape, contents)
    assert message in str(info.value)


# --- shared helpers --------------------------------------------------------------------------


def test_channel_options() -> None:
    assert channel_options(10, None) == [
        ("grpc.max_send_message_length", 10),
        ("grpc.max_receive_message_length", 10),
    ]
    assert channel_options(10, [("grpc.max_receive_message_length", -1), ("a", "b")]) == [
        ("grpc.max_send_message_length", 10),
        ("grpc.max_receive_message_length", -1),
        ("a", "b"),
    ]


def test_stream_book_matches_ids_in_order() -> None:
    book = StreamBook()
    book.sent("x", "m1", None)
    book.sent("x", "m2", 3)
    book.sent("y", "m3", 1)
    assert book.answered("y") == ("m3", 1)
    assert book.answered("x") == ("m1", None)
    assert book.answered("x") == ("m2", 3)
    assert book.answered("x") is None
    assert book.answered("never") is None


# --- dependencies ----------------------------------------------------------------------------

_IMPORT_CHECK = """
import sys
sys.modules["opentelemetry"] = None  # as if it were not installed
import inferd_client
from inferd_client._tracing import trace_metadata
assert trace_metadata() is None
# (grpc itself imports grpc_health and grpc_reflection when they are installed.)
heavy = ("server", "onnxruntime", "pydantic", "prometheus_client", "opentelemetry")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy and sys.modules[m] is not None)
assert not loaded, loaded
print("ok")
"""


def test_client_imports_without_optional_or_server_packages() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
