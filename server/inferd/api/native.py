"""The native API, `inferd.v1`: Predict and ModelStatus. Converts protobuf <-> the data plane
(`server/inferd/api/dataplane.py`) and decides nothing; errors become statuses in
`server/inferd/api/status.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from inferd.api.dataplane import DataPlane, InferenceRequest, InferenceResponse
from inferd.api.inference import WireTensor
from inferd.api.status import ANSWERED, abort_on_error, grpc_status
from inferd.api.streaming import answer_concurrently
from inferd.api.wire import Incoming
from inferd.core.models.registry import LoadedVersion, ModelStatusEvent, ModelVersion
from inferd.core.types import ModelState
from inferd_wire.proto.inferd.v1 import (
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    tensor_pb2,
)

PROTOCOL = "native"

STATES = {
    ModelState.UNKNOWN: model_status_pb2.MODEL_STATE_UNKNOWN,
    ModelState.LOADING: model_status_pb2.MODEL_STATE_LOADING,
    ModelState.READY: model_status_pb2.MODEL_STATE_READY,
    ModelState.UNLOADING: model_status_pb2.MODEL_STATE_UNLOADING,
    ModelState.UNLOADED: model_status_pb2.MODEL_STATE_UNLOADED,
    ModelState.FAILED: model_status_pb2.MODEL_STATE_FAILED,
}


class PredictServicer(predict_pb2_grpc.PredictServicer):
    def __init__(self, dataplane: DataPlane, stream_window: int = 256) -> None:
        self._dataplane = dataplane
        self._stream_window = stream_window

    @abort_on_error
    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return await self._predict(request, context.time_remaining())

    @abort_on_error
    async def PredictStream(
        self,
        request_iterator: AsyncIterator[Incoming[predict_pb2.PredictRequest]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[predict_pb2.PredictStreamResponse]:
        """Requests run concurrently (so they can share batches); each is answered as soon as
        it is done, with its own status, a message that did not parse included (with an empty
        id). At most `stream_window` are in flight."""

        async def answer(
            incoming: Incoming[predict_pb2.PredictRequest],
        ) -> predict_pb2.PredictStreamResponse:
            request = incoming.message
            if request is None:  # refused before it was parsed: no id to answer with
                code, message = incoming.refusal or (grpc.StatusCode.INTERNAL, "")
                error = predict_pb2.RequestStatus(code=code.value[0], message=message)
                return predict_pb2.PredictStreamResponse(error=error)
            try:
                response = await self._predict(request, context.time_remaining())
                return predict_pb2.PredictStreamResponse(id=request.id, response=response)
            except ANSWERED as exc:
                code, message = grpc_status(exc)
                error = predict_pb2.RequestStatus(code=code.value[0], message=message)
                return predict_pb2.PredictStreamResponse(id=request.id, error=error)

        def failed(
            incoming: Incoming[predict_pb2.PredictRequest], error: Exception
        ) -> predict_pb2.PredictStreamResponse:
            status = predict_pb2.RequestStatus(
                code=grpc.StatusCode.INTERNAL.value[0],
                message=f"internal error ({type(error).__name__}); the server logged it",
            )
            request = incoming.message
            return predict_pb2.PredictStreamResponse(
                id=request.id if request is not None else "", error=status
            )

        async for response in answer_concurrently(
            request_iterator, answer, self._stream_window, failed
        ):
            yield response

    async def _predict(
        self, request: predict_pb2.PredictRequest, time_remaining: float | None
    ) -> predict_pb2.PredictResponse:
        return await self._dataplane.infer(
            lambda: inference_request(request),
            predict_response,
            protocol=PROTOCOL,
            model=request.model,
            request_id=request.id,
            time_remaining=time_remaining,
        )


def inference_request(request: predict_pb2.PredictRequest) -> InferenceRequest:
    return InferenceRequest(
        model=request.model,
        version=request.version if request.HasField("version") else None,
        inputs=[WireTensor(t.name, t.datatype, t.shape, t.contents) for t in request.inputs],
        outputs=request.outputs,
        id=request.id,
        priority=request.priority,
        timeout_us=request.timeout_us,
    )


def predict_response(response: InferenceResponse) -> predict_pb2.PredictResponse:
    return predict_pb2.PredictResponse(
        model=response.model,
        version=response.version,
        id=response.id,
        outputs=[
            tensor_pb2.Tensor(name=t.name, datatype=t.datatype, shape=t.shape, contents=t.contents)
            for t in response.outputs
        ],
    )


class ModelStatusServicer(model_status_pb2_grpc.ModelStatusServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    @abort_on_error
    async def GetModelStatus(
        self, request: model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.GetModelStatusResponse:
        version = request.version if request.HasField("version") else None
        versions = self._dataplane.versions(request.model, version)
        return model_status_pb2.GetModelStatusResponse(
            model=request.model, versions=version_statuses(versions)
        )

    @abort_on_error
    async def ListModels(
        self, request: model_status_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.ListModelsResponse:
        return model_status_pb2.ListModelsResponse(
            models=[
                model_status_pb2.ModelSummary(
                    name=name, versions=version_statuses(self._dataplane.versions(name))
                )
                for name in self._dataplane.model_names()
            ]
        )

    @abort_on_error
    async def GetModelMetadata(
        self, request: model_status_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.ModelMetadata:
        version = request.version if request.HasField("version") else None
        target = self._dataplane.model(request.model, version)
        return _metadata(target, self._dataplane.versions(request.model))

    @abort_on_error
    async def WatchModelStatus(
        self, request: model_status_pb2.WatchModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_status_pb2.ModelStatusEvent]:
        async for event in self._dataplane.watch(request.model):
            yield _event(event)


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def version_statuses(versions: Iterable[ModelVersion]) -> list[model_status_pb2.VersionStatus]:
    out = []
    for v in versions:
        s = v.statistics
        out.append(
            model_status_pb2.VersionStatus(
                version=v.version,
                state=STATES[v.state],
                reason=v.reason,
                last_change=_timestamp(v.last_change),
                statistics=model_status_pb2.VersionStatistics(
                    request_success=s.success.count,
                    request_failure=s.failure.count,
                    inference_count=s.inference_count,
                    execution_count=s.execution_count,
                    queue_ns=s.queue.ns,
                    compute_ns=s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns,
                    batch_sizes=s.batch_sizes,
                    stages=model_status_pb2.RequestStages(
                        count=s.handler.count,
                        decode_ns=s.decode.ns,
                        queue_ns=s.queue.ns,
                        assemble_ns=s.compute_input.ns,
                        handoff_ns=s.handoff.ns,
                        infer_ns=s.compute_infer.ns,
                        split_ns=s.compute_output.ns,
                        encode_ns=s.encode.ns,
                        handler_ns=s.handler.ns,
                    ),
                ),
            )
        )
    return out


def _metadata(
    target: LoadedVersion, versions: list[ModelVersion]
) -> model_status_pb2.ModelMetadata:
    signature, policy = target.signature, target.policy
    return model_status_pb2.ModelMetadata(
        name=target.name,
        version=target.version,
        versions=[v.version for v in versions if v.state is ModelState.READY],
        platform="onnxruntime_onnx",
        inputs=[
            tensor_pb2.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=signature.full_shape(s)
            )
            for s in signature.inputs
        ],
        outputs=[
            tensor_pb2.TensorMetadata(
                name=s.name, datatype=s.datatype, shape=signature.full_shape(s)
            )
            for s in signature.outputs
        ],
        max_batch_size=signature.max_batch_size,
        batching=model_status_pb2.BatchingSettings(
            max_batch_size=policy.max_batch_size,
            max_queue_delay_us=round(policy.max_queue_delay * 1e6),
            preferred_batch_sizes=policy.preferred_batch_sizes,
            max_queue_size=policy.max_queue_size,
            instances=policy.instances,
            default_timeout_us=round((target.default_timeout or 0) * 1e6),
        ),
        execution_providers=target.providers,
    )


def _event(event: ModelStatusEvent) -> model_status_pb2.ModelStatusEvent:
    return model_status_pb2.ModelStatusEvent(
        model=event.model,
        version=event.version,
        state=STATES[event.state],
        reason=event.reason,
        time=_timestamp(event.time),
    )
