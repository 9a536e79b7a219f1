"""A hand-written codec for grpc.health.v1 Check, so the client needs no grpcio-health-checking.

message HealthCheckRequest  { string service = 1; }
message HealthCheckResponse { ServingStatus status = 1; }  // 0 UNKNOWN .. 3 SERVICE_UNKNOWN
"""

from __future__ import annotations

CHECK_METHOD = "/grpc.health.v1.Health/Check"

STATUS_NAMES: dict[int, str] = {
    0: "UNKNOWN",
    1: "SERVING",
    2: "NOT_SERVING",
    3: "SERVICE_UNKNOWN",
}

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_varint(data: bytes, offset: int) -> tuple[int, int]:
    """(value, offset after it); raises ValueError when truncated or over 10 bytes."""
    value = 0
    for i in range(10):
        if offset >= len(data):
            raise ValueError("truncated varint in HealthCheckResponse")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, offset
    raise ValueError("varint over 10 bytes in HealthCheckResponse")


def encode_health_request(service: str) -> bytes:
    """HealthCheckRequest{service} as protobuf bytes (b'' for the empty service)."""
    if not service:
        return b""
    raw = service.encode("utf-8")
    return b"\x0a" + _encode_varint(len(raw)) + raw


def decode_health_response(data: bytes) -> str:
    """The ServingStatus name in a HealthCheckResponse ('SERVING', 'NOT_SERVING', ...).

    Unknown fields are skipped; a number outside the enum comes back as its decimal string.
    """
    status = 0
    offset = 0
    while offset < len(data):
        key, offset = _decode_varint(data, offset)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, offset = _decode_varint(data, offset)
            if field == 1:
                status = value
        elif wire_type == _LENGTH_DELIMITED:
            length, offset = _decode_varint(data, offset)
            offset += length
        elif wire_type == _FIXED64:
            offset += 8
        elif wire_type == _FIXED32:
            offset += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in HealthCheckResponse")
        if offset > len(data):
            raise ValueError("truncated field in HealthCheckResponse")
    if status >= 1 << 63:  # a negative int32 enum value travels as a 64-bit two's complement
        status -= 1 << 64
    return STATUS_NAMES.get(status, str(status))
