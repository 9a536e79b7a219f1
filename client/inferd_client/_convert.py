"""The one place that builds and reads inferd protobuf messages for the clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from inferd_client.errors import InferError, error_from_status
from inferd_client.types import (
    ModelMetadata,
    ModelStatusEvent,
    RepositoryEntry,
    StreamRequest,
    StreamResult,
    TensorInfo,
    VersionStatus,
)
from inferd_wire.codec import from_wire, to_wire
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2,
    model_status_pb2,
    predict_pb2,
    tensor_pb2,
)

_STATE_PREFIX = "MODEL_STATE_"


# --- Predict ---------------------------------------------------------------------------------


def _tensor(name: str, array: Any) -> tensor_pb2.Tensor:
    if not isinstance(name, str):
        raise TypeError(f"input names must be str, got {type(name).__name__}")
    datatype, shape, contents = to_wire(
        array if isinstance(array, np.ndarray) else np.asarray(array)
    )
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=shape, contents=contents)


def predict_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    version: int | None = None,
    request_id: str = "",
    priority: int = 0,
    timeout_us: int = 0,
) -> predict_pb2.PredictRequest:
    """A PredictRequest; inputs that are not arrays go through np.asarray."""
    if isinstance(outputs, str):  # one name, not a sequence of characters
        outputs = [outputs]
    request = predict_pb2.PredictRequest(
        model=model,
        id=request_id,
        inputs=[_tensor(name, array) for name, array in inputs.items()],
        outputs=list(outputs or ()),
        priority=priority,
        timeout_us=timeout_us,
    )
    if version is not None:
        request.version = version
    return request


def stream_request(request: StreamRequest) -> predict_pb2.PredictRequest:
    if not isinstance(request, StreamRequest):
        raise TypeError(f"infer_stream takes StreamRequest items, got {type(request).__name__}")
    return predict_request(
        request.model,
        request.inputs,
        request.outputs,
        request.version,
        request.request_id,
        request.priority,
        request.timeout_us,
    )


def decode_outputs(tensors: Iterable[tensor_pb2.Tensor]) -> dict[str, np.ndarray]:
    """Output name -> array. Fixed-size arrays are read-only views of the received bytes.

    Raises InferError(INTERNAL) when a tensor's contents do not match its datatype and shape.
    """
    out: dict[str, np.ndarray] = {}
    for tensor in tensors:
        name = tensor.name
        contents = tensor.contents  # every access to a bytes field copies: read it once
        try:
            out[name] = from_wire(tensor.datatype, tensor.shape, contents)
        except ValueError as exc:
            raise InferError(
                grpc.StatusCode.INTERNAL, f"malformed output {name!r} in the response: {exc}"
            ) from None
    return out


def predict_outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return decode_outputs(response.outputs)


def stream_result(
    message: predict_pb2.PredictStreamResponse, requested: tuple[str, int | None] | None
) -> StreamResult:
    """A StreamResult; `requested` is the (model, version) sent under this id, if known."""
    model, version = requested if requested is not None else ("", None)
    kind = message.WhichOneof("result")
    if kind == "response":
        response = message.response
        try:
            outputs = decode_outputs(response.outputs)
        except InferError as exc:
            return StreamResult(message.id, None, exc, response.model or model, version)
        return StreamResult(message.id, outputs, None, response.model, response.version)
    if kind == "error":
        error = error_from_status(message.error.code, message.error.message)
    else:
        error = InferError(
            grpc.StatusCode.INTERNAL, "stream response carries neither a response nor an error"
        )
    return StreamResult(message.id, None, error, model, version)


# --- ModelStatus -----------------------------------------------------------------------------


def status_request(model: str, version: int | None) -> model_status_pb2.GetModelStatusRequest:
    request = model_status_pb2.GetModelStatusRequest(model=model)
    if version is not None:
        request.version = version
    return request


def metadata_request(model: str, version: int | None) -> model_status_pb2.GetModelMetadataRequest:
    request = model_status_pb2.GetModelMetadataRequest(model=model)
    if version is not None:
        request.version = version
    return request


def list_request() -> model_status_pb2.ListModelsRequest:
    return model_status_pb2.ListModelsRequest()


def watch_request(model: str) -> model_status_pb2.WatchModelStatusRequest:
    return model_status_pb2.WatchModelStatusRequest(model=model)


def state_name(state: int) -> str:
    """'READY' for MODEL_STATE_READY; a number outside the enum as its decimal string."""
    try:
        name = model_status_pb2.ModelState.Name(state)
    except ValueError:
        return str(state)
    return name.removeprefix(_STATE_PREFIX)


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


_STAGE_FIELDS = model_status_pb2.RequestStages.DESCRIPTOR.fields


def version_status(message: model_status_pb2.VersionStatus) -> VersionStatus:
    stats = message.statistics
    return VersionStatus(
        version=message.version,
        state=state_name(message.state),
        reason=message.reason,
        last_change=_time(message, "last_change"),
        statistics={
            "request_success": stats.request_success,
            "request_failure": stats.request_failure,
            "inference_count": stats.inference_count,
            "execution_count": stats.execution_count,
            "queue_ns": stats.queue_ns,
            "compute_ns": stats.compute_ns,
            "batch_sizes": {int(k): int(v) for k, v in sorted(stats.batch_sizes.items())},
            # count, then ns summed over those requests: decode, queue, assemble, handoff,
            # infer, split, encode, handler.
            "stages": {
                f.name: getattr(stats.stages, f.name) for f in stats.stages.DESCRIPTOR.fields
            },
        },
    )


def version_statuses(
    response: model_status_pb2.GetModelStatusResponse | model_repository_pb2.LoadModelResponse,
) -> list[VersionStatus]:
    return [version_status(v) for v in response.versions]


def model_list(response: model_status_pb2.ListModelsResponse) -> dict[str, list[VersionStatus]]:
    return {m.name: [version_status(v) for v in m.versions] for m in response.models}


def _tensor_info(message: tensor_pb2.TensorMetadata) -> TensorInfo:
    return TensorInfo(message.name, message.datatype, tuple(int(d) for d in message.shape))


def model_metadata(message: model_status_pb2.ModelMetadata) -> ModelMetadata:
    batching: dict[str, Any] = {}
    if message.HasField("batching"):
        b = message.batching
        batching = {
            "max_batch_size": b.max_batch_size,
            "max_queue_delay_us": b.max_queue_delay_us,
            "preferred_batch_sizes": list(b.preferred_batch_sizes),
            "max_queue_size": b.max_queue_size,
            "instances": b.instances,
            "default_timeout_us": b.default_timeout_us,
        }
    return ModelMetadata(
        name=message.name,
        version=message.version,
        versions=tuple(message.versions),
        platform=message.platform,
        inputs=tuple(_tensor_info(t) for t in message.inputs),
        outputs=tuple(_tensor_info(t) for t in message.outputs),
        max_batch_size=message.max_batch_size,
        batching=batching,
        execution_providers=tuple(message.execution_providers),
    )


def status_event(message: model_status_pb2.ModelStatusEvent) -> ModelStatusEvent:
    return ModelStatusEvent(
        model=message.model,
        version=message.version,
        state=state_name(message.state),
        reason=message.reason,
        time=_time(message, "time"),
    )


# --- ModelRepository -------------------------------------------------------------------------


def index_request() -> model_repository_pb2.RepositoryIndexRequest:
    return model_repository_pb2.RepositoryIndexRequest()


def repository_index(
    response: model_repository_pb2.RepositoryIndexResponse,
) -> list[RepositoryEntry]:
    return [
        RepositoryEntry(e.model, e.version, state_name(e.state), e.reason) for e in response.models
    ]


def load_request(model: str) -> model_repository_pb2.LoadModelRequest:
    return model_repository_pb2.LoadModelRequest(model=model)


def unload_request(model: str) -> model_repository_pb2.UnloadModelRequest:
    return model_repository_pb2.UnloadModelRequest(model=model)
