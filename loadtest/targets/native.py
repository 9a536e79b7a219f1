"""inferd's native API as a load target: inferd.v1.Predict/Predict for the load,
ModelStatus for the model's inputs and the server's counters.

Requests are serialised once per payload and sent as bytes, and responses are kept as bytes:
a worker spends its CPU on gRPC, not on protobuf, so the generator stays ahead of the server.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from inferd.loadtest.inputs import ModelSignature, Payload, TensorSpec
from inferd.loadtest.server_stats import ServerCounters
from inferd.loadtest.targets.channels import SenderChannels, blocking_channel
from inferd.loadtest.targets.target import (
    RequestFailed,
    RequestSender,
    TargetDriver,
    TargetError,
    TargetSpec,
)
from inferd_wire.codec import to_wire
from inferd_wire.proto.inferd.v1 import (
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    tensor_pb2,
)

PREDICT_METHOD = "/inferd.v1.Predict/Predict"
CONTROL_TIMEOUT_S = 10.0


def _version(spec: TargetSpec) -> int | None:
    if not spec.version:
        return None
    try:
        return int(spec.version)
    except ValueError:
        raise TargetError(
            f"native target: version must be an integer, got {spec.version!r}"
        ) from None


def encode_predict_request(spec: TargetSpec, payload: Payload) -> bytes:
    request = predict_pb2.PredictRequest(model=spec.model)
    version = _version(spec)
    if version is not None:
        request.version = version
    for name, array in payload.items():
        datatype, shape, contents = to_wire(array)
        request.inputs.append(
            tensor_pb2.Tensor(name=name, datatype=datatype, shape=shape, contents=contents)
        )
    return request.SerializeToString()


class NativeDriver(TargetDriver):
    def __init__(self, spec: TargetSpec) -> None:
        super().__init__(spec)
        self._channel = blocking_channel(spec)
        self._status = model_status_pb2_grpc.ModelStatusStub(self._channel)  # type: ignore[no-untyped-call]

    def _metadata(self) -> model_status_pb2.ModelMetadata:
        request = model_status_pb2.GetModelMetadataRequest(model=self.spec.model)
        version = _version(self.spec)
        if version is not None:
            request.version = version
        try:
            metadata: model_status_pb2.ModelMetadata = self._status.GetModelMetadata(
                request, timeout=CONTROL_TIMEOUT_S
            )
            return metadata
        except grpc.RpcError as exc:
            raise TargetError(
                f"{self.spec.where}: GetModelMetadata({self.spec.model}) failed: "
                f"{exc.code().name}: {exc.details()}"
            ) from None

    def signature(self) -> ModelSignature:
        metadata = self._metadata()
        return ModelSignature(
            model=self.spec.model,
            inputs=tuple(
                TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape))
                for t in metadata.inputs
            ),
            batched=metadata.max_batch_size > 0,
        )

    def describe(self) -> dict[str, str]:
        metadata = self._metadata()
        batching = metadata.batching
        return {
            "protocol": "inferd.v1",
            "model_version": str(metadata.version),
            "execution_providers": ",".join(metadata.execution_providers),
            "max_batch_size": str(metadata.max_batch_size),
            "max_queue_delay_us": str(batching.max_queue_delay_us),
            "instances": str(batching.instances),
        }

    def counters(self) -> ServerCounters | None:
        request = model_status_pb2.GetModelStatusRequest(model=self.spec.model)
        version = _version(self.spec)
        if version is not None:
            request.version = version
        try:
            response = self._status.GetModelStatus(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError:
            return None
        return ServerCounters.total(
            ServerCounters(
                request_success=v.statistics.request_success,
                inference_count=v.statistics.inference_count,
                execution_count=v.statistics.execution_count,
                queue_ns=v.statistics.queue_ns,
                compute_ns=v.statistics.compute_ns,
                batch_sizes=dict(v.statistics.batch_sizes),
            )
            for v in response.versions
        )

    def close(self) -> None:
        self._channel.close()


class NativeSender(RequestSender):
    def __init__(self, spec: TargetSpec, payloads: Sequence[Payload], timeout_s: float) -> None:
        self._requests = [encode_predict_request(spec, p) for p in payloads]
        self._timeout_s = timeout_s
        self._channels = SenderChannels(spec)
        # No serialisers: the request goes out as the bytes prepared above, the response
        # stays bytes.
        self._predict = self._channels.in_turn(PREDICT_METHOD)

    async def send(self, payload_index: int) -> None:
        try:
            await self._predict()(self._requests[payload_index], timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name, exc.details() or "") from None

    async def close(self) -> None:
        await self._channels.close()
