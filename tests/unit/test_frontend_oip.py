"""The Open Inference Protocol frontend's own rules (`inferd.api.oip_tensors`), without a
server: version and parameters, raw and typed contents, refused extensions, and the reply."""

from __future__ import annotations

import numpy as np
import pytest

from inferd.api import oip_tensors
from inferd.api.dataplane import InferenceResponse
from inferd.api.inference import WireTensor
from inferd.api.status import Unimplemented
from inferd.core.errors import InvalidInput
from inferd_wire.codec import from_wire
from inferd_wire.proto.inference import grpc_service_pb2 as pb


def infer_request(**parameters: pb.InferParameter) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r1")
    for name, parameter in parameters.items():
        request.parameters[name].CopyFrom(parameter)
    return request


def options_refused(request: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidInput) as info:
        oip_tensors.request_options(request)
    return info.value.message


# --- version and parameters -------------------------------------------------------------------


def test_request_without_parameters_has_no_priority_timeout_or_version() -> None:
    assert oip_tensors.request_options(infer_request()) == oip_tensors.RequestOptions(
        version=None, priority=0, timeout_us=0
    )


def test_priority_and_timeout_are_read_from_int64_or_uint64_parameters() -> None:
    request = infer_request(
        priority=pb.InferParameter(int64_param=3),
        timeout=pb.InferParameter(uint64_param=250_000),
    )
    request.model_version = "7"
    assert oip_tensors.request_options(request) == oip_tensors.RequestOptions(
        version=7, priority=3, timeout_us=250_000
    )


def test_other_request_parameters_are_ignored() -> None:
    request = infer_request(sequence_id=pb.InferParameter(string_param="x"))
    assert oip_tensors.request_options(request).priority == 0


@pytest.mark.parametrize(
    ("parameter", "kind"),
    [
        (pb.InferParameter(string_param="1"), "string_param"),
        (pb.InferParameter(bool_param=True), "bool_param"),
        (pb.InferParameter(double_param=1.0), "double_param"),
        (pb.InferParameter(), "empty"),
    ],
)
def test_priority_that_is_not_an_integer_is_refused(
    parameter: pb.InferParameter, kind: str
) -> None:
    assert options_refused(infer_request(priority=parameter)) == (
        f"parameter 'priority' must be an integer (int64_param or uint64_param), not {kind}"
    )


def test_negative_timeout_is_refused() -> None:
    request = infer_request(timeout=pb.InferParameter(int64_param=-5))
    assert options_refused(request) == "parameter 'timeout' must not be negative, got -5"


@pytest.mark.parametrize("version", ["x", "-1", "1.0", " 1", "²", "1" * 19, "٣"])
def test_model_version_that_is_not_a_small_number_is_refused(version: str) -> None:
    request = infer_request()
    request.model_version = version
    assert options_refused(request) == (
        f"model_version: {version!r} is not a version number (1 to 18 digits 0-9)"
    )


def test_a_huge_version_string_is_quoted_in_part() -> None:
    request = infer_request()
    request.model_version = "9" * 5000
    message = options_refused(request)
    assert len(message) < 300 and "(5002 characters)" in message


def test_empty_version_leaves_the_choice_to_the_policy() -> None:
    assert oip_tensors.parse_version("version", "") is None
    assert oip_tensors.parse_version("version", "12") == 12


# --- inputs -----------------------------------------------------------------------------------


def test_raw_input_contents_are_taken_one_per_input_in_order() -> None:
    request = infer_request()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="INT8", shape=[2])
    request.raw_input_contents.extend([b"\0\0\x80\x3f", b"\1\2"])
    assert oip_tensors.wire_tensors(request) == [
        WireTensor("a", "FP32", [1], b"\0\0\x80\x3f"),
        WireTensor("b", "INT8", [2], b"\1\2"),
    ]


def test_raw_input_contents_must_have_one_entry_per_input() -> None:
    request = infer_request()
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.inputs.add(name="b", datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(4))
    with pytest.raises(InvalidInput, match="raw_input_contents has 1 entries for 2 inputs"):
        oip_tensors.wire_tensors(request)


def test_typed_contents_beside_raw_contents_are_refused() -> None:
    request = infer_request()
    tensor = request.inputs.add(name="a", datatype="FP32", shape=[1])
    tensor.contents.fp32_contents.append(1.0)
    request.raw_input_contents.append(bytes(4))
    with pytest.raises(InvalidInput, match="input 'a': contents must be empty"):
        oip_tensors.wire_tensors(request)


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("BOOL", "bool_contents", [True, False, True]),
        ("UINT8", "uint_contents", [0, 7, 255]),
        ("UINT64", "uint64_contents", [0, 1, 2**64 - 1]),
        ("INT16", "int_contents", [-32768, 0, 32767]),
        ("INT64", "int64_contents", [-(2**63), 0, 2**63 - 1]),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0]),
        ("FP64", "fp64_contents", [0.1, -2.5, 1e300]),
    ],
)
def test_typed_contents_become_the_same_bytes_as_raw_contents(
    datatype: str, field: str, values: list[object]
) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="a", datatype=datatype, shape=[3])
    getattr(tensor.contents, field).extend(values)
    contents = oip_tensors.typed_contents(tensor)
    assert not isinstance(contents, bytes)
    assert from_wire(datatype, [3], contents.to_bytes()).tolist() == values


def test_typed_bytes_contents_are_length_prefixed() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="s", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"ab", b""])
    contents = oip_tensors.typed_contents(tensor)
    assert not isinstance(contents, bytes)
    assert contents.to_bytes() == b"\2\0\0\0ab\0\0\0\0"


def test_typed_contents_must_hold_the_shapes_element_count() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="a", datatype="INT32", shape=[2, 2])
    tensor.contents.int_contents.extend([1, 2, 3])
    with pytest.raises(InvalidInput) as info:
        oip_tensors.typed_contents(tensor)
    assert info.value.message == (
        "input 'a': contents.int_contents holds 3 elements; shape [2, 2] of INT32 needs 4"
    )


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_precision_has_no_typed_field_and_must_be_sent_raw(datatype: str) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="h", datatype=datatype, shape=[1])
    with pytest.raises(InvalidInput, match=f"input 'h': {datatype} has no typed contents field"):
        oip_tensors.typed_contents(tensor)


def test_unknown_datatype_or_negative_dim_is_left_to_the_shared_validation() -> None:
    unknown = pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP128", shape=[1])
    negative = pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[-1])
    assert oip_tensors.typed_contents(unknown) == b""
    assert oip_tensors.typed_contents(negative) == b""


# --- refused extensions -----------------------------------------------------------------------


def test_input_in_shared_memory_is_unimplemented() -> None:
    request = infer_request()
    tensor = request.inputs.add(name="a", datatype="FP32", shape=[1])
    tensor.parameters["shared_memory_region"].string_param = "region"
    with pytest.raises(Unimplemented, match="input 'a' names a shared-memory region"):
        oip_tensors.wire_tensors(request)


def test_output_in_shared_memory_or_classified_is_unimplemented() -> None:
    request = infer_request()
    request.outputs.add(name="y").parameters["shared_memory_byte_size"].int64_param = 4
    with pytest.raises(Unimplemented, match="output 'y' names a shared-memory region"):
        oip_tensors.requested_outputs(request)
    request = infer_request()
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    with pytest.raises(Unimplemented, match="classification extension"):
        oip_tensors.requested_outputs(request)


# --- the whole request and the reply ----------------------------------------------------------


def test_infer_request_carries_every_field_to_the_data_plane() -> None:
    request = infer_request(
        priority=pb.InferParameter(uint64_param=2), timeout=pb.InferParameter(int64_param=10)
    )
    request.model_version = "3"
    request.inputs.add(name="a", datatype="INT8", shape=[2])
    request.raw_input_contents.append(b"\1\2")
    request.outputs.add(name="y")
    decoded = oip_tensors.infer_request(request)
    assert (decoded.model, decoded.version, decoded.id) == ("m", 3, "r1")
    assert (decoded.priority, decoded.timeout_us) == (2, 10)
    assert decoded.inputs == [WireTensor("a", "INT8", [2], b"\1\2")]
    assert decoded.outputs == ["y"]


def test_parameter_error_is_reported_before_input_errors() -> None:
    request = infer_request(priority=pb.InferParameter(string_param="high"))
    request.inputs.add(name="a", datatype="FP32", shape=[1])
    request.raw_input_contents.extend([b"", b""])  # wrong too, but named second
    with pytest.raises(InvalidInput, match="parameter 'priority'"):
        oip_tensors.infer_request(request)


def test_infer_response_puts_every_output_in_raw_output_contents_in_order() -> None:
    y = np.array([[1.0, 2.0]], dtype=np.float32)
    response = InferenceResponse(
        model="m",
        version=4,
        id="r1",
        outputs=(
            WireTensor("y", "FP32", [1, 2], y.tobytes()),
            WireTensor("s", "BYTES", [1], b"\1\0\0\0z"),
        ),
    )
    message = oip_tensors.infer_response(response)
    assert (message.model_name, message.model_version, message.id) == ("m", "4", "r1")
    assert [(o.name, o.datatype, list(o.shape)) for o in message.outputs] == [
        ("y", "FP32", [1, 2]),
        ("s", "BYTES", [1]),
    ]
    assert list(message.raw_output_contents) == [y.tobytes(), b"\1\0\0\0z"]
    assert all(not o.HasField("contents") for o in message.outputs)
