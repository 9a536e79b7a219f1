"""The native control plane, `inferd.v1.ModelRepository`: Index, Load, Unload; every call needs
the control token."""

from __future__ import annotations

import grpc

from inferd.api.control_auth import ControlAuth, requires_control_token
from inferd.api.native import STATES, version_statuses
from inferd.api.status import abort_on_error
from inferd.core.models.control import ModelController
from inferd_wire.proto.inferd.v1 import model_repository_pb2, model_repository_pb2_grpc


class ModelRepositoryServicer(model_repository_pb2_grpc.ModelRepositoryServicer):
    def __init__(self, controller: ModelController, control_auth: ControlAuth) -> None:
        self._controller = controller
        self.control_auth = control_auth

    @abort_on_error
    @requires_control_token
    async def Index(
        self,
        request: model_repository_pb2.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext,
    ) -> model_repository_pb2.RepositoryIndexResponse:
        entries = await self._controller.index()
        return model_repository_pb2.RepositoryIndexResponse(
            models=[
                model_repository_pb2.RepositoryIndexEntry(
                    model=e.model, version=e.version, state=STATES[e.state], reason=e.reason
                )
                for e in entries
            ]
        )

    @abort_on_error
    @requires_control_token
    async def Load(
        self, request: model_repository_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_repository_pb2.LoadModelResponse:
        await self._controller.load(request.model)
        versions = self._controller.registry.versions_or_empty(request.model)
        return model_repository_pb2.LoadModelResponse(versions=version_statuses(versions))

    @abort_on_error
    @requires_control_token
    async def Unload(
        self, request: model_repository_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_repository_pb2.UnloadModelResponse:
        await self._controller.unload(request.model)
        return model_repository_pb2.UnloadModelResponse()
