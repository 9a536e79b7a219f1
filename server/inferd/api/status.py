"""The one place errors become gRPC statuses: the core's errors, the frontends' own
`Unimplemented`, and the OverflowError of a status watcher that fell behind.

Every servicer method takes `@abort_on_error`, which ends the call with the error's status;
a stream that answers each request with its own status (PredictStream, ModelStreamInfer)
catches `ANSWERED` and asks `grpc_status` for the code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn, TypeVar, cast

import grpc

from inferd.core import errors

_CODES: dict[type[errors.InferdError], grpc.StatusCode] = {
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InferenceFailed: grpc.StatusCode.INTERNAL,
}


class Unimplemented(Exception):
    """A request uses a protocol feature inferd does not implement (answered UNIMPLEMENTED)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# What a handler answers with a status. Anything else escapes to gRPC, which answers UNKNOWN.
ANSWERED = (errors.InferdError, Unimplemented, OverflowError)


def status_code(error: errors.InferdError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def grpc_status(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The code and message that answer one of the `ANSWERED` errors; the message at most
    MAX_MESSAGE characters, whatever a client sent (`errors.quoted` clips what it quotes)."""
    if isinstance(error, errors.InferdError):
        return status_code(error), _clip(error.message)
    if isinstance(error, Unimplemented):
        return grpc.StatusCode.UNIMPLEMENTED, _clip(error.message)
    if isinstance(error, OverflowError):
        # Only a status watcher that fell behind raises it (ModelRegistry.watch).
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _clip(str(error))
    raise TypeError(f"{type(error).__name__} has no gRPC status") from error


# The status travels in the trailers, which gRPC limits to 8 KiB by default: a longer message
# would turn the answer into RESOURCE_EXHAUSTED.
MAX_MESSAGE = 1024


def _clip(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[: MAX_MESSAGE - 40]}... ({len(message)} characters)"


async def answer_with_status(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    """End the call with a status; if its caller has already gone there is nobody to answer:
    end it quietly (gRPC logs a cancelled handler at debug level only) and count it."""
    if context.cancelled():
        unanswered.inc()
        raise asyncio.CancelledError
    await context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


class _Tally:
    """A count read by the metrics collector (`observability/admission_metrics.py`)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1


# Errors whose caller had left before they could be answered.
unanswered = _Tally()


Method = TypeVar("Method", bound=Callable[..., Any])


def abort_on_error(method: Method) -> Method:
    """A servicer method (unary, or an async generator for a response stream) whose
    `ANSWERED` errors end the call with their status (`grpc_status`)."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: object, request: object, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[object]:
            try:
                async with contextlib.aclosing(method(self, request, context)) as responses:
                    async for response in responses:
                        yield response
                return
            except ANSWERED as error:
                status = grpc_status(error)
            del request
            await answer_with_status(context, *status)

        return cast(Method, stream)

    @functools.wraps(method)
    async def unary(self: object, request: object, context: grpc.aio.ServicerContext) -> object:
        try:
            return await method(self, request, context)
        except ANSWERED as error:
            status = grpc_status(error)
        # Aborted outside the except block and without the request: gRPC keeps the abort's
        # exception, whose traceback holds this frame and would otherwise hold the error's
        # (its __context__), and with them the request, until the garbage collector runs: a
        # 20 MB typed request kept ~420 MB that way.
        del request
        await answer_with_status(context, *status)

    return cast(Method, unary)
