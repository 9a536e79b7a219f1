"""grpc.health.v1 Check for the clients, on grpcio-health-checking's generated messages.

The clients build their Check callable from `CHECK_METHOD` with these two functions as its
serializers (rather than `health_pb2_grpc.HealthStub`, whose Check returns the message), so
`health()` hands back the status name.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
CHECK_METHOD = f"/{_SERVICE.full_name}/{_SERVICE.methods_by_name['Check'].name}"

_ServingStatus = health_pb2.HealthCheckResponse.ServingStatus
STATUS_NAMES: dict[int, str] = {
    number: _ServingStatus.Name(number) for number in _ServingStatus.values()
}


def encode_health_request(service: str) -> bytes:
    """HealthCheckRequest{service} as protobuf bytes (b'' for the empty service)."""
    return health_pb2.HealthCheckRequest(service=service).SerializeToString()


def decode_health_response(data: bytes) -> str:
    """The ServingStatus name in a HealthCheckResponse ('SERVING', 'NOT_SERVING', ...).

    A number outside the enum comes back as its decimal string; malformed bytes raise
    ValueError (grpc reports a failed deserializer as an INTERNAL error).
    """
    try:
        status = health_pb2.HealthCheckResponse.FromString(data).status
    except DecodeError as exc:
        raise ValueError(f"malformed HealthCheckResponse: {exc}") from None
    return STATUS_NAMES.get(status, str(status))


__all__ = ["CHECK_METHOD", "STATUS_NAMES", "decode_health_response", "encode_health_request"]
