"""The Open Inference Protocol (KServe v2) with Triton's extensions:
`inference.GRPCInferenceService`, on the same port and through the same core as the native API.

Converts protobuf <-> the data plane (`server/inferd/api/dataplane.py`, the path every frontend
shares) and decides nothing; errors become statuses in `server/inferd/api/status.py`.
docs/api.md lists each RPC and whether inferd implements it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from inferd.api import oip_model, oip_tensors
from inferd.api.control_auth import ControlAuth, requires_control_token
from inferd.api.dataplane import DataPlane
from inferd.api.status import ANSWERED, Unimplemented, abort_on_error, grpc_status
from inferd.api.streaming import answer_concurrently
from inferd.api.wire import Incoming
from inferd.core.models.control import ModelController
from inferd.core.models.registry import LoadedVersion
from inferd_wire.proto.inference import grpc_service_pb2 as pb
from inferd_wire.proto.inference import grpc_service_pb2_grpc as pb_grpc

PROTOCOL = "oip"
SERVER_NAME = "inferd"

# Only what inferd really implements: model configuration, statistics, schedule_policy (dynamic
# batching with the `priority` and `timeout` request parameters) and model_repository (index,
# and load/unload under explicit model control, all with the control token). Not listed: the
# shared-memory extensions, classification, sequence, trace, logging.
EXTENSIONS = ("model_configuration", "model_repository", "statistics", "schedule_policy")


def _server_version() -> str:
    try:
        return metadata.version("inferd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class GRPCInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        controller: ModelController,
        control_auth: ControlAuth,
        stream_window: int = 256,
    ) -> None:
        self._dataplane = dataplane
        self._controller = controller
        self.control_auth = control_auth
        self._stream_window = stream_window
        self._version = _server_version()

    # -- health and metadata -----------------------------------------------------------------

    @abort_on_error
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @abort_on_error
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready)

    @abort_on_error
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Not ready (rather than an error) for an unknown model or version, as Triton answers."""
        version = oip_tensors.parse_version("version", request.version)
        return pb.ModelReadyResponse(ready=self._dataplane.model_ready(request.name, version))

    @abort_on_error
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
        )

    @abort_on_error
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        target = self._model(request.name, request.version)
        return oip_model.model_metadata(target, self._dataplane.versions(request.name))

    @abort_on_error
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        target = self._model(request.name, request.version)
        return pb.ModelConfigResponse(config=oip_model.model_config(target))

    @abort_on_error
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        version = oip_tensors.parse_version("version", request.version)
        versions = self._dataplane.loaded_versions(request.name, version)
        return pb.ModelStatisticsResponse(
            model_stats=[oip_model.model_statistics(v) for v in versions]
        )

    @abort_on_error
    @requires_control_token
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            models=[oip_model.index_entry(v) for v in self._dataplane.every_version(request.ready)]
        )

    def _model(self, name: str, version: str) -> LoadedVersion:
        return self._dataplane.model(name, oip_tensors.parse_version("version", version))

    # -- inference ---------------------------------------------------------------------------

    @abort_on_error
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context.time_remaining())

    @abort_on_error
    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[Incoming[pb.ModelInferRequest]],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (so they can share batches); each is answered as soon as
        it is done. A failed request is answered with error_message (and its id); the stream
        goes on. At most `stream_window` requests are in flight."""

        async def answer(incoming: Incoming[pb.ModelInferRequest]) -> pb.ModelStreamInferResponse:
            request = incoming.message
            if request is None:  # refused before it was parsed
                _code, message = incoming.refusal or (grpc.StatusCode.INTERNAL, "")
                return pb.ModelStreamInferResponse(error_message=message)
            try:
                response = await self._infer(request, context.time_remaining())
                return pb.ModelStreamInferResponse(infer_response=response)
            except ANSWERED as exc:
                _code, message = grpc_status(exc)
                return pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )

        def failed(
            incoming: Incoming[pb.ModelInferRequest], error: Exception
        ) -> pb.ModelStreamInferResponse:
            message = f"internal error ({type(error).__name__}); the server logged it"
            request = incoming.message
            if request is None:
                return pb.ModelStreamInferResponse(error_message=message)
            return pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name,
                    model_version=request.model_version,
                    id=request.id,
                ),
            )

        async for response in answer_concurrently(
            request_iterator, answer, self._stream_window, failed
        ):
            yield response

    async def _infer(
        self, request: pb.ModelInferRequest, time_remaining: float | None
    ) -> pb.ModelInferResponse:
        return await self._dataplane.infer(
            lambda: oip_tensors.infer_request(request),
            oip_tensors.infer_response,
            protocol=PROTOCOL,
            model=request.model_name,
            request_id=request.id,
            time_remaining=time_remaining,
        )

    # -- model repository (the same control plane as inferd.v1.ModelRepository) ------------

    @abort_on_error
    @requires_control_token
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await self._controller.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @abort_on_error
    @requires_control_token
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await self._controller.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- not available -----------------------------------------------------------------------

    @abort_on_error
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        raise _shared_memory_unimplemented("system")

    @abort_on_error
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        raise _shared_memory_unimplemented("system")

    @abort_on_error
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        raise _shared_memory_unimplemented("system")

    @abort_on_error
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        raise _shared_memory_unimplemented("CUDA")

    @abort_on_error
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise _shared_memory_unimplemented("CUDA")

    @abort_on_error
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        raise _shared_memory_unimplemented("CUDA")

    @abort_on_error
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraceSettingResponse:
        raise Unimplemented(
            "TraceSetting is not implemented by inferd: tracing is OpenTelemetry, configured "
            "when the server starts"
        )

    @abort_on_error
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LogSettingsResponse:
        raise Unimplemented(
            "LogSettings is not implemented by inferd: logging is configured when the server starts"
        )


def _shared_memory_unimplemented(kind: str) -> Unimplemented:
    return Unimplemented(
        f"the {kind} shared-memory extension is not implemented by inferd: send tensors in the "
        "request (raw_input_contents)"
    )
