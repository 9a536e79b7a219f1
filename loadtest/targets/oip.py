"""Any Open Inference Protocol (KServe v2) gRPC server as a load target: inferd's OIP frontend,
Triton, MLServer. `inference.GRPCInferenceService/ModelInfer` with `raw_input_contents` for the
load, ModelMetadata for the inputs, ModelStatistics (a Triton extension; servers without it
answer UNIMPLEMENTED and the report then has no server-side split) for the counters.

The message classes are the project's generated stubs (`inferd_wire.proto.inference`, Triton's
grpc_service.proto names); without them this target reports why it cannot run.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

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

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CONTROL_TIMEOUT_S = 10.0


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """(grpc_service_pb2, grpc_service_pb2_grpc), or TargetError saying why not."""
    try:
        messages = importlib.import_module("inferd_wire.proto.inference.grpc_service_pb2")
        services = importlib.import_module("inferd_wire.proto.inference.grpc_service_pb2_grpc")
    except ImportError as exc:
        raise TargetError(
            "Open Inference Protocol stubs not present (`from inferd_wire.proto.inference import "
            f"grpc_service_pb2` failed: {exc})"
        ) from None
    return messages, services


def stubs_present() -> bool:
    try:
        load_stubs()
    except TargetError:
        return False
    return True


def encode_infer_request(spec: TargetSpec, payload: Payload) -> bytes:
    messages, _ = load_stubs()
    request = messages.ModelInferRequest(model_name=spec.model, model_version=spec.version)
    for name, array in payload.items():
        datatype, shape, contents = to_wire(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(contents)
    data: bytes = request.SerializeToString()
    return data


class OipDriver(TargetDriver):
    def __init__(self, spec: TargetSpec) -> None:
        super().__init__(spec)
        self._messages, services = load_stubs()
        self._channel = blocking_channel(spec)
        self._service = services.GRPCInferenceServiceStub(self._channel)
        self._has_statistics = True

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._service, method)(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise TargetError(
                f"{self.spec.where}: {method} failed: {exc.code().name}: {exc.details()}"
            ) from None

    def signature(self) -> ModelSignature:
        metadata = self._call(
            "ModelMetadata",
            self._messages.ModelMetadataRequest(name=self.spec.model, version=self.spec.version),
        )
        inputs = tuple(
            TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape))
            for t in metadata.inputs  # type: ignore[attr-defined]
        )
        # The protocol has no max_batch_size; servers that batch declare dim 0 as -1 on every
        # input (Triton with max_batch_size > 0, MLServer from its model settings).
        batched = bool(inputs) and all(t.shape and t.shape[0] == -1 for t in inputs)
        return ModelSignature(model=self.spec.model, inputs=inputs, batched=batched)

    def describe(self) -> dict[str, str]:
        try:
            server = self._call("ServerMetadata", self._messages.ServerMetadataRequest())
        except TargetError:
            return {"protocol": "inference.GRPCInferenceService"}
        return {
            "protocol": "inference.GRPCInferenceService",
            "server": f"{server.name} {server.version}",  # type: ignore[attr-defined]
        }

    def counters(self) -> ServerCounters | None:
        if not self._has_statistics:
            return None
        request = self._messages.ModelStatisticsRequest(
            name=self.spec.model, version=self.spec.version
        )
        try:
            response = self._service.ModelStatistics(request, timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._has_statistics = False
            return None
        parts = []
        for model in response.model_stats:
            stats = model.inference_stats
            parts.append(
                ServerCounters(
                    request_success=stats.success.count,
                    inference_count=model.inference_count,
                    execution_count=model.execution_count,
                    queue_ns=stats.queue.ns,
                    compute_ns=(
                        stats.compute_input.ns + stats.compute_infer.ns + stats.compute_output.ns
                    ),
                    batch_sizes={b.batch_size: b.compute_infer.count for b in model.batch_stats},
                )
            )
        return ServerCounters.total(parts)

    def close(self) -> None:
        self._channel.close()


class OipSender(RequestSender):
    def __init__(self, spec: TargetSpec, payloads: Sequence[Payload], timeout_s: float) -> None:
        self._requests = [encode_infer_request(spec, p) for p in payloads]
        self._timeout_s = timeout_s
        self._channels = SenderChannels(
            spec,
            # Unlimited, as tritonclient sets it: large raw outputs must not fail the run.
            options=[("grpc.max_receive_message_length", -1)],
        )
        self._infer = self._channels.in_turn(INFER_METHOD)

    async def send(self, payload_index: int) -> None:
        try:
            await self._infer()(self._requests[payload_index], timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(exc.code().name, exc.details() or "") from None

    async def close(self) -> None:
        await self._channels.close()
