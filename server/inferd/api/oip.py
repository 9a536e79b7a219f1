"""The Open Inference Protocol (KServe v2) with Triton's extensions:
`inference.GRPCInferenceService`, on the same port and through the same core as the native API.

Converts protobuf <-> core and decides nothing: inference goes through
`server/inferd/api/inference.infer` (one validation path for every frontend), errors become codes in
`server/inferd/api/status.py`. docs/api.md lists each RPC and whether inferd implements it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import NoReturn, TypeVar

import grpc

from inferd.api import inference, oip_model, oip_tensors
from inferd.api.control_auth import ControlAuth
from inferd.api.oip_tensors import Unimplemented
from inferd.api.status import status_code
from inferd.api.streaming import answer_concurrently
from inferd.core.errors import InferdError, ModelNotFound
from inferd.core.models.control import ModelController
from inferd.core.models.registry import ModelRegistry, ModelVersion
from inferd.core.observer import Observer
from inferd.core.types import ModelState
from inferd.observability.tracing import RequestTracing
from inferd_wire.proto.inference import grpc_service_pb2 as pb
from inferd_wire.proto.inference import grpc_service_pb2_grpc as pb_grpc

PROTOCOL = "oip"
SERVER_NAME = "inferd"

# Only what inferd really implements: model configuration, statistics, schedule_policy (dynamic
# batching with the `priority` and `timeout` request parameters) and model_repository (index,
# and load/unload under explicit model control with the control token). Not listed: the
# shared-memory extensions, classification, sequence, trace, logging.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "schedule_policy")

T = TypeVar("T")


def _server_version() -> str:
    try:
        return metadata.version("inferd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class GRPCInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        limits: inference.Limits,
        observer: Observer,
        tracing: RequestTracing,
        controller: ModelController,
        auth: ControlAuth,
        stream_window: int = 256,
    ) -> None:
        self._registry = registry
        self._controller = controller
        self._auth = auth
        self._limits = limits
        self._observer = observer
        self._tracing = tracing
        self._stream_window = stream_window
        self._version = _server_version()

    # -- health and metadata -----------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._registry.accepting)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Not ready (rather than an error) for an unknown model or version, as Triton answers."""
        version = await _call(context, oip_tensors.parse_version, "version", request.version)
        try:
            self._registry.resolve(request.name, version)
        except InferdError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        target = await _call(context, self._resolve, request.name, request.version)
        return oip_model.model_metadata(target, self._registry.versions(request.name))

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        target = await _call(context, self._resolve, request.name, request.version)
        return pb.ModelConfigResponse(config=oip_model.model_config(target))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        versions = await _call(context, self._statistics_versions, request.name, request.version)
        return pb.ModelStatisticsResponse(
            model_stats=[oip_model.model_statistics(v) for v in versions]
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[
                oip_model.index_entry(v)
                for name in self._registry.model_names()
                for v in self._registry.versions(name)
                if v.state is ModelState.READY or not request.ready
            ]
        )

    def _resolve(self, name: str, version: str) -> ModelVersion:
        return self._registry.resolve(name, oip_tensors.parse_version("version", version))

    def _statistics_versions(self, name: str, version: str) -> list[ModelVersion]:
        """Every loaded version of the model named (every model when none is), or the one
        version named; versions that never loaded have no statistics, as in Triton."""
        number = oip_tensors.parse_version("version", version)
        names = [name] if name else self._registry.model_names()
        versions = [
            v
            for n in names
            for v in self._registry.versions(n)
            if v.signature is not None and (number is None or v.version == number)
        ]
        if name and number is not None and not versions:
            raise ModelNotFound(f"model '{name}' has no loaded version {number}")
        return versions

    # -- inference ---------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, context.time_remaining())
        except InferdError as exc:
            await _abort(context, status_code(exc), exc.message)
        except Unimplemented as exc:
            await _abort(context, grpc.StatusCode.UNIMPLEMENTED, exc.message)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they can share batches); each is answered as soon as
        it is done. A failed request is answered with error_message (and its id); the stream
        goes on. At most `stream_window` requests are in flight."""

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                response = await self._infer(request, context.time_remaining())
                return pb.ModelStreamInferResponse(infer_response=response)
            except (InferdError, Unimplemented) as exc:
                return pb.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )

        async for response in answer_concurrently(request_iterator, answer, self._stream_window):
            yield response

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse:
        accounting = inference.Accounting(
            self._observer, self._registry, PROTOCOL, request.model_name, time_remaining
        )
        try:
            with accounting:
                options = oip_tensors.request_options(request)
                _target, result = await inference.infer(
                    self._registry,
                    self._limits,
                    model=request.model_name,
                    version=options.version,
                    tensors=oip_tensors.wire_tensors(request),
                    outputs=oip_tensors.requested_outputs(request),
                    request_id=request.id,
                    priority=options.priority,
                    timeout_us=options.timeout_us,
                    time_remaining=time_remaining,
                    trace_context=self._tracing.context(),
                    accounting=accounting,
                )
                with self._tracing.encode_span():
                    return oip_tensors.infer_response(request.id, result)
        finally:
            self._tracing.annotate(request.model_name, accounting.version, request.id)

    # -- model repository (the same control plane as inferd.v1.ModelRepository) ------------

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        try:
            self._auth.check(context.invocation_metadata())
            await self._controller.load(request.model_name)
        except InferdError as exc:
            await _abort(context, status_code(exc), exc.message)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self._auth.check(context.invocation_metadata())
            await self._controller.unload(request.model_name)
        except InferdError as exc:
            await _abort(context, status_code(exc), exc.message)
        return pb.RepositoryModelUnloadResponse()

    # -- not available -----------------------------------------------------------------------

    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        await _shared_memory_unimplemented(context, "system")

    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        await _shared_memory_unimplemented(context, "system")

    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await _shared_memory_unimplemented(context, "system")

    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        await _shared_memory_unimplemented(context, "CUDA")

    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        await _shared_memory_unimplemented(context, "CUDA")

    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await _shared_memory_unimplemented(context, "CUDA")

    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        await _abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "TraceSetting is not implemented by inferd: tracing is OpenTelemetry, configured "
            "when the server starts",
        )

    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        await _abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "LogSettings is not implemented by inferd: logging is configured when the server "
            "starts",
        )


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


async def _shared_memory_unimplemented(context: grpc.aio.ServicerContext, kind: str) -> NoReturn:
    await _abort(
        context,
        grpc.StatusCode.UNIMPLEMENTED,
        f"the {kind} shared-memory extension is not implemented by inferd: send tensors in the "
        "request (raw_input_contents)",
    )


async def _call(context: grpc.aio.ServicerContext, function: Callable[..., T], *args: object) -> T:
    """`function(*args)`, with a core error answered as its status code."""
    try:
        return function(*args)
    except InferdError as exc:
        await _abort(context, status_code(exc), exc.message)
