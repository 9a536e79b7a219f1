"""grpc.health.v1: grpc's asyncio health servicer, plus the List RPC that it leaves
unimplemented (grpcio-health-checking 1.85 registers List but raises NotImplementedError in it,
which gRPC logs as an ERROR with a traceback on every call)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


class Health(HealthServicer):
    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """Every service's status, as Check would answer each."""
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )
