"""The native API, `inferd.v1`: Predict and ModelStatus. Converts protobuf <-> core; decides
nothing (validation is `server/inferd/api/inference.py`, policy is `server/core`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from inferd.api import inference
from inferd.api.status import status_code
from inferd.api.streaming import answer_concurrently
from inferd.core.errors import InferdError, ModelNotFound
from inferd.core.models.registry import ModelRegistry, ModelStatusEvent, ModelVersion
from inferd.core.observer import Observer
from inferd.core.types import InferResult, ModelState
from inferd.observability.tracing import RequestTracing
from inferd_wire.codec import to_wire
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
    def __init__(
        self,
        registry: ModelRegistry,
        limits: inference.Limits,
        observer: Observer,
        tracing: RequestTracing,
        stream_window: int = 256,
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._observer = observer
        self._tracing = tracing
        self._stream_window = stream_window

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        try:
            return await self._predict(request, context.time_remaining())
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
            raise  # unreachable: abort raises

    async def PredictStream(
        self,
        request_iterator: AsyncIterator[predict_pb2.PredictRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[predict_pb2.PredictStreamResponse]:
        """Requests run concurrently (so they can share batches); each is answered as soon as
        it is done, with its own status. At most `stream_window` are in flight."""

        async def answer(request: predict_pb2.PredictRequest) -> predict_pb2.PredictStreamResponse:
            try:
                response = await self._predict(request, context.time_remaining())
                return predict_pb2.PredictStreamResponse(id=request.id, response=response)
            except InferdError as exc:
                error = predict_pb2.RequestStatus(
                    code=status_code(exc).value[0], message=exc.message
                )
                return predict_pb2.PredictStreamResponse(id=request.id, error=error)

        async for response in answer_concurrently(request_iterator, answer, self._stream_window):
            yield response

    async def _predict(
        self, request: predict_pb2.PredictRequest, time_remaining: float | None
    ) -> predict_pb2.PredictResponse:
        version = request.version if request.HasField("version") else None
        accounting = inference.Accounting(
            self._observer, self._registry, PROTOCOL, request.model, time_remaining
        )
        try:
            with accounting:
                _target, result = await inference.infer(
                    self._registry,
                    self._limits,
                    model=request.model,
                    version=version,
                    tensors=[
                        inference.WireTensor(t.name, t.datatype, t.shape, t.contents)
                        for t in request.inputs
                    ],
                    outputs=request.outputs,
                    request_id=request.id,
                    priority=request.priority,
                    timeout_us=request.timeout_us,
                    time_remaining=time_remaining,
                    trace_context=self._tracing.context(),
                    accounting=accounting,
                )
                with self._tracing.encode_span():
                    return _response(request, result)
        finally:
            self._tracing.annotate(request.model, accounting.version, request.id)


def _response(
    request: predict_pb2.PredictRequest, result: InferResult
) -> predict_pb2.PredictResponse:
    outputs = []
    for name, array in result.outputs.items():
        datatype, shape, contents = to_wire(array)
        outputs.append(
            tensor_pb2.Tensor(name=name, datatype=datatype, shape=shape, contents=contents)
        )
    return predict_pb2.PredictResponse(
        model=result.model, version=result.version, id=request.id, outputs=outputs
    )


class ModelStatusServicer(model_status_pb2_grpc.ModelStatusServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    async def GetModelStatus(
        self, request: model_status_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.GetModelStatusResponse:
        try:
            versions = self._registry.versions(request.model)
            if request.HasField("version"):
                versions = [v for v in versions if v.version == request.version]
                if not versions:
                    raise ModelNotFound(f"model '{request.model}' has no version {request.version}")
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        return model_status_pb2.GetModelStatusResponse(
            model=request.model, versions=version_statuses(versions)
        )

    async def ListModels(
        self, request: model_status_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.ListModelsResponse:
        return model_status_pb2.ListModelsResponse(
            models=[
                model_status_pb2.ModelSummary(
                    name=name, versions=version_statuses(self._registry.versions(name))
                )
                for name in self._registry.model_names()
            ]
        )

    async def GetModelMetadata(
        self, request: model_status_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.ModelMetadata:
        try:
            version = request.version if request.HasField("version") else None
            target = self._registry.resolve(request.model, version)
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        return _metadata(target, self._registry.versions(request.model))

    async def WatchModelStatus(
        self, request: model_status_pb2.WatchModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_status_pb2.ModelStatusEvent]:
        try:
            async for event in self._registry.watch(request.model):
                yield _event(event)
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
        except OverflowError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


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
                ),
            )
        )
    return out


def _metadata(target: ModelVersion, versions: list[ModelVersion]) -> model_status_pb2.ModelMetadata:
    signature, policy = target.signature, target.policy
    assert signature is not None and policy is not None
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
