"""Requests arrive as bytes: every service is registered so that gRPC hands its handler the
message unparsed, and the message is admitted and parsed here.

Two things need the bytes before the message:
- a message that does not parse is answered INVALID_ARGUMENT, quietly (gRPC's own
  deserializer would answer UNKNOWN and log a traceback per message: ~13k of them for 60k
  fuzzed messages);
- an inference request is charged its size against the server's `ByteBudget` before it is
  parsed (a message of typed contents takes several times its wire size once parsed), and
  refused RESOURCE_EXHAUSTED at once when the budget is spent.

Request streams that answer each message on its own (PredictStream, ModelStreamInfer) receive
`Incoming` items, so that a message refused here is answered in the stream like any other and
the stream goes on; other streams end with the status.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from inferd.core.admission import ByteBudget
from inferd.core.errors import QueueFull
from inferd.core.observer import Observer

M = TypeVar("M")

# A request stream's handler that takes `Incoming` items instead of messages.
PER_MESSAGE_STREAMS = frozenset(
    {"/inferd.v1.Predict/PredictStream", "/inference.GRPCInferenceService/ModelStreamInfer"}
)
# Methods whose requests are charged against the byte budget.
INFERENCE_METHODS = frozenset(
    {"/inferd.v1.Predict/Predict", "/inference.GRPCInferenceService/ModelInfer"}
    | PER_MESSAGE_STREAMS
)
# The `protocol` label of a refused message's metrics, by service.
PROTOCOLS = {"inferd.v1": "native", "inference": "oip"}


@dataclass(slots=True)
class Incoming(Generic[M]):
    """One message of a per-message request stream: parsed, or refused with a status."""

    message: M | None
    refusal: tuple[grpc.StatusCode, str] | None = None
    charged: int = 0
    _budget: ByteBudget | None = None

    def release(self) -> None:
        """Refund its bytes: its answer has been sent (or never will be)."""
        if self._budget is not None:
            self._budget.release(self.charged)
            self._budget = None


class Wire:
    """Registers services on a gRPC server with the parsing and admission above."""

    def __init__(self, budget: ByteBudget | None, observer: Observer) -> None:
        self.budget = budget
        self._observer = observer

    def add(
        self,
        add_servicer: Callable[[Any, Any], None],
        servicer: object,
        server: grpc.aio.Server,
    ) -> None:
        """Register `servicer` as the generated `add_*Servicer_to_server` would, with every
        method taking its request as bytes."""
        capture = _Capture()
        add_servicer(servicer, capture)
        for service, handlers in capture.services:
            wrapped = {
                name: self._wrap(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),)
            )
            server.add_registered_method_handlers(service, wrapped)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        budget = self.budget if method in INFERENCE_METHODS else None
        protocol = PROTOCOLS.get(method[1:].rpartition(".")[0].partition("/")[0], "")
        message_type = _message_name(parse)
        refused = self._refused if protocol else _ignore

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, parse, message_type, budget, protocol, refused),
                response_serializer=serialize,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream, parse, message_type, protocol, refused),
                response_serializer=serialize,
            )
        per_message = method in PER_MESSAGE_STREAMS
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _stream(handler.stream_unary, parse, message_type, None, False, protocol, refused),
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream(
                handler.stream_stream, parse, message_type, budget, per_message, protocol, refused
            ),
            response_serializer=serialize,
        )

    def _refused(self, protocol: str, code: grpc.StatusCode, started: float) -> None:
        self._observer.request_finished(
            protocol, "", None, code.name, time.perf_counter() - started
        )


def _ignore(protocol: str, code: grpc.StatusCode, started: float) -> None:
    return None


Refused = Callable[[str, grpc.StatusCode, float], None]


class _Capture:
    """Stands in for the server while a generated `add_*Servicer_to_server` registers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[object]) -> None:
        """The generated code registers each service twice; the second call has its name."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services.append((service, handlers))


def _message_name(parse: Callable[[bytes], Any] | None) -> str:
    owner = getattr(parse, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else "request"


def undecodable(message_type: str) -> str:
    return (
        f"the request is not a valid {message_type} message: its protobuf encoding could "
        "not be parsed"
    )


def _unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any],
    parse: Callable[[bytes], Any],
    message_type: str,
    budget: ByteBudget | None,
    protocol: str,
    refused: Refused,
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        size = len(raw)
        if budget is not None:
            try:
                budget.acquire(size)
            except QueueFull as exc:
                refused(protocol, grpc.StatusCode.RESOURCE_EXHAUSTED, time.perf_counter())
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
        try:
            try:
                request = parse(raw)
            except DecodeError:
                refused(protocol, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter())
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable(message_type))
            del raw
            try:
                return await behavior(request, context)
            finally:
                # The frame outlives the call in an abort's traceback (`api/status.py`).
                del request
        except NotImplementedError:
            # A generated method nobody implements: gRPC would log a traceback per call.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not implemented")
        finally:
            if budget is not None:
                budget.release(size)

    return handle


def _unary_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
    parse: Callable[[bytes], Any],
    message_type: str,
    protocol: str,
    refused: Refused,
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            refused(protocol, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter())
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable(message_type))

    if _is_async_generator(behavior):

        async def handle_stream(
            raw: bytes, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            request = await parsed(raw, context)
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return handle_stream

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await parsed(raw, context), context)

    return handle


def _stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any],
    parse: Callable[[bytes], Any],
    message_type: str,
    budget: ByteBudget | None,
    per_message: bool,
    protocol: str,
    refused: Refused,
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]:
    """A request stream's handler; `behavior` returns an async iterator (stream-stream) or a
    coroutine (stream-unary)."""

    async def messages(
        raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for raw in raws:
            try:
                message = parse(raw)
            except DecodeError:
                refused(protocol, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter())
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, undecodable(message_type))
            yield message

    async def incoming(raws: AsyncIterator[bytes]) -> AsyncIterator[Incoming[Any]]:
        async for raw in raws:
            started = time.perf_counter()
            size = len(raw)
            if budget is not None:
                try:
                    budget.acquire(size)
                except QueueFull as exc:
                    refused(protocol, grpc.StatusCode.RESOURCE_EXHAUSTED, started)
                    yield Incoming(None, (grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message))
                    continue
            try:
                message = parse(raw)
            except DecodeError:
                if budget is not None:
                    budget.release(size)
                refused(protocol, grpc.StatusCode.INVALID_ARGUMENT, started)
                yield Incoming(None, (grpc.StatusCode.INVALID_ARGUMENT, undecodable(message_type)))
                continue
            yield Incoming(message, None, size, budget)

    if _is_async_generator(behavior):

        async def handle_stream(
            raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            requests = incoming(raws) if per_message else messages(raws, context)
            async with contextlib.aclosing(behavior(requests, context)) as responses:
                async for response in responses:
                    yield response

        return handle_stream

    async def handle(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(messages(raws, context), context)

    return handle


def _is_async_generator(behavior: Callable[..., Any]) -> bool:
    """Whether a handler yields its responses (else it writes them and returns)."""
    return inspect.isasyncgenfunction(behavior)
