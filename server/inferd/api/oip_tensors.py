"""Open Inference Protocol messages <-> the data plane's: a ModelInferRequest becomes an
`InferenceRequest` (inputs as raw bytes, typed `contents` converted by the wire codec; its
parameters become priority and timeout), an `InferenceResponse` becomes raw_output_contents.

Only the protocol's own rules are checked here (raw vs typed contents, typed element counts,
parameter types); everything a model declares is checked once, by `server/inferd/api/inference.py`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inferd.api.dataplane import InferenceRequest, InferenceResponse
from inferd.api.inference import TypedContents, WireTensor
from inferd.api.status import Unimplemented
from inferd.core.errors import InvalidInput, quoted
from inferd.core.models.repository import VERSION_NAME
from inferd_wire.codec import element_count, wire_contents
from inferd_wire.proto.inference import grpc_service_pb2 as pb

# Which InferTensorContents field holds each datatype's elements. FP16 and BF16 have none.
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
RAW_ONLY = ("FP16", "BF16")

# Parameters that name a shared-memory region, on inputs and requested outputs.
SHARED_MEMORY_PARAMETERS = ("shared_memory_region", "shared_memory_byte_size")


@dataclass(frozen=True, slots=True)
class RequestOptions:
    version: int | None
    priority: int
    timeout_us: int


def infer_request(request: pb.ModelInferRequest) -> InferenceRequest:
    """The data plane's request; the protocol's errors surface in this order: version and
    parameters, then inputs, then requested outputs."""
    options = request_options(request)
    return InferenceRequest(
        model=request.model_name,
        version=options.version,
        inputs=wire_tensors(request),
        outputs=requested_outputs(request),
        id=request.id,
        priority=options.priority,
        timeout_us=options.timeout_us,
    )


def parse_version(field: str, version: str) -> int | None:
    """ "" -> None (the policy's choice); up to 18 ASCII digits -> that version (what a
    repository's version directories may be named: `core/models/repository.py`)."""
    if not version:
        return None
    if VERSION_NAME.fullmatch(version) is None:
        raise InvalidInput(
            f"{field}: {quoted(version)} is not a version number (1 to 18 digits 0-9)"
        )
    return int(version)


def request_options(request: pb.ModelInferRequest) -> RequestOptions:
    """The version and the `priority` and `timeout` (microseconds) parameters; every other
    request parameter is ignored, as Triton's clients send some (sequence_id, ...)."""
    parameters = request.parameters
    return RequestOptions(
        version=parse_version("model_version", request.model_version),
        priority=_int_parameter(parameters, "priority"),
        timeout_us=_int_parameter(parameters, "timeout"),
    )


def _int_parameter(parameters: Mapping[str, pb.InferParameter], name: str) -> int:
    if name not in parameters:
        return 0
    parameter = parameters[name]
    which = parameter.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidInput(
            f"parameter '{name}' must be an integer (int64_param or uint64_param), "
            f"not {which or 'empty'}"
        )
    value = int(getattr(parameter, which))
    if value < 0:
        raise InvalidInput(f"parameter '{name}' must not be negative, got {value}")
    return value


def wire_tensors(request: pb.ModelInferRequest) -> list[WireTensor]:
    """Each input with its bytes: raw_input_contents (one entry per input, in order) when the
    request has any, else each input's typed contents converted."""
    raw = list(request.raw_input_contents)  # each access copies: read once
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order (or none, and typed contents)"
        )
    tensors = []
    for i, tensor in enumerate(request.inputs):
        _refuse_shared_memory("input", tensor.name, tensor.parameters)
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(
                    f"input '{tensor.name}': contents must be empty when raw_input_contents is used"
                )
            contents = raw[i]
        else:
            contents = typed_contents(tensor)
        tensors.append(WireTensor(tensor.name, tensor.datatype, tensor.shape, contents))
    return tensors


def typed_contents(tensor: pb.ModelInferRequest.InferInputTensor) -> TypedContents | bytes:
    """The typed `contents` of one input, to convert once the tensor has passed every check
    (`inference.py`), after checking that the datatype's field holds exactly product(shape)
    elements. An unknown datatype or a negative dim gives b"": the shared validation names
    that problem."""
    name, datatype = tensor.name, tensor.datatype
    if datatype in RAW_ONLY:
        raise InvalidInput(
            f"input {quoted(name)}: {datatype} has no typed contents field; send it in "
            "raw_input_contents"
        )
    field = TYPED_FIELDS.get(datatype)
    shape = [int(d) for d in tensor.shape]
    if field is None or any(d < 0 for d in shape):
        return b""
    values = getattr(tensor.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {quoted(name)}: contents.{field} holds {len(values)} elements; shape {shape} "
            f"of {datatype} needs {count}"
        )
    return _Typed(name, datatype, field, values, count)


@dataclass(frozen=True, slots=True)
class _Typed:
    """One input's typed contents (`inference.TypedContents`)."""

    name: str
    datatype: str
    field: str
    values: Sequence[object]
    count: int

    def to_bytes(self) -> bytes:
        try:
            return wire_contents(self.datatype, self.values)
        except (OverflowError, ValueError):
            raise InvalidInput(
                f"input {quoted(self.name)}: contents.{self.field} holds a value out of range "
                f"for {self.datatype}"
            ) from None


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    names = []
    for output in request.outputs:
        _refuse_shared_memory("output", output.name, output.parameters)
        if "classification" in output.parameters:
            raise Unimplemented(
                f"requested output {quoted(output.name)}: the classification extension is not "
                "implemented by inferd; request the raw output"
            )
        names.append(output.name)
    return names


def _refuse_shared_memory(
    kind: str, name: str, parameters: Mapping[str, pb.InferParameter]
) -> None:
    if any(p in parameters for p in SHARED_MEMORY_PARAMETERS):
        raise Unimplemented(
            f"{kind} {quoted(name)} names a shared-memory region; inferd does not implement the "
            "shared-memory extensions: send the tensor in the request"
        )


def infer_response(response: InferenceResponse) -> pb.ModelInferResponse:
    """Every output raw, in raw_output_contents, in the order of `outputs`."""
    message = pb.ModelInferResponse(
        model_name=response.model, model_version=str(response.version), id=response.id
    )
    for tensor in response.outputs:
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    message.raw_output_contents.extend(tensor.contents for tensor in response.outputs)
    return message
