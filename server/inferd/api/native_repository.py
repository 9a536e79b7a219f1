"""The native control plane, `inferd.v1.ModelRepository`: Index, Load, Unload."""

from __future__ import annotations

import grpc

from inferd.api.control_auth import ControlAuth
from inferd.api.native import STATES, version_statuses
from inferd.api.status import status_code
from inferd.core.errors import InferdError
from inferd.core.models.control import ModelController
from inferd_wire.proto.inferd.v1 import model_repository_pb2, model_repository_pb2_grpc


class ModelRepositoryServicer(model_repository_pb2_grpc.ModelRepositoryServicer):
    def __init__(self, controller: ModelController, auth: ControlAuth) -> None:
        self._controller = controller
        self._auth = auth

    async def Index(
        self,
        request: model_repository_pb2.RepositoryIndexRequest,
        context: grpc.aio.ServicerContext,
    ) -> model_repository_pb2.RepositoryIndexResponse:
        try:
            self._auth.check(context.invocation_metadata())
            entries = await self._controller.index()
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        return model_repository_pb2.RepositoryIndexResponse(
            models=[
                model_repository_pb2.RepositoryIndexEntry(
                    model=e.model, version=e.version, state=STATES[e.state], reason=e.reason
                )
                for e in entries
            ]
        )

    async def Load(
        self, request: model_repository_pb2.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_repository_pb2.LoadModelResponse:
        try:
            self._auth.check(context.invocation_metadata())
            await self._controller.load(request.model)
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        versions = self._controller.registry.versions_or_empty(request.model)
        return model_repository_pb2.LoadModelResponse(versions=version_statuses(versions))

    async def Unload(
        self, request: model_repository_pb2.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> model_repository_pb2.UnloadModelResponse:
        try:
            self._auth.check(context.invocation_metadata())
            await self._controller.unload(request.model)
        except InferdError as exc:
            await context.abort(status_code(exc), exc.message)
            raise
        return model_repository_pb2.UnloadModelResponse()
