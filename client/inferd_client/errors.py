"""Typed errors raised by the inferd clients.

Every failed RPC surfaces as an `InferError` (or one of its subclasses, picked by the gRPC
status code), carrying `.code` (a `grpc.StatusCode`) and `.details` (the server's message).
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceededError",
    "InferError",
    "InvalidInputError",
    "ModelNotFoundError",
    "RequestCancelledError",
    "ServerBusyError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "error_from_status",
]


class InferError(Exception):
    """A request failed; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(code, details)
        self.code: grpc.StatusCode = code
        self.details: str = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}" if self.details else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.details!r})"


class ModelNotFoundError(InferError):
    """NOT_FOUND: no such model, or no such (READY) version."""


class InvalidInputError(InferError):
    """INVALID_ARGUMENT: the inputs do not match what the model declares."""


class ServerBusyError(InferError):
    """RESOURCE_EXHAUSTED: the server's queue is full (or a message is over the size limit)."""


class DeadlineExceededError(InferError):
    """DEADLINE_EXCEEDED: the gRPC deadline or the request's timeout_us passed."""


class UnavailableError(InferError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""


class RequestCancelledError(InferError):
    """CANCELLED: the request was cancelled (by the client, or the server on shutdown)."""


class UnauthenticatedError(InferError):
    """UNAUTHENTICATED: the credentials were missing or rejected."""


_BY_CODE: dict[grpc.StatusCode, type[InferError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}

# Numeric status code (as carried by a streamed RequestStatus) -> grpc.StatusCode.
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def make_error(code: grpc.StatusCode, details: str) -> InferError:
    """The InferError subclass for `code` (InferError itself when none is specific)."""
    return _BY_CODE.get(code, InferError)(code, details)


def error_from_rpc(exc: grpc.RpcError) -> InferError:
    """The typed error for a failed RPC (a grpc.Call / grpc.aio.AioRpcError)."""
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return make_error(code, details if isinstance(details, str) else str(exc))


def error_from_status(code_number: int, message: str) -> InferError:
    """The typed error for a numeric gRPC status code (a streamed request's status).

    An unknown number becomes UNKNOWN, with the number kept in the details.
    """
    code = _CODE_BY_NUMBER.get(code_number)
    if code is None:
        return InferError(grpc.StatusCode.UNKNOWN, f"(status code {code_number}) {message}")
    return make_error(code, message)
