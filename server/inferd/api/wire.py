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

    def __init__(
        self,
        budget: ByteBudget | None,
        observer: Observer,
        route: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler | None] | None = None,
    ) -> None:
        """`route(method, handler)`: a handler to use instead of the servicer's, or None (a
        frontend of `--workers N` forwards the RPCs it does not answer itself)."""
        self.budget = budget
        self._observer = observer
        self._route = route

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
                name: self._handler(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            }
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),)
            )
            server.add_registered_method_handlers(service, wrapped)

    def _handler(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        routed = self._route(method, handler) if self._route is not None else None
        return routed if routed is not None else self._wrap(method, handler)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        protocol = PROTOCOLS.get(method[1:].rpartition(".")[0].partition("/")[0], "")
        m = _Method(
            handler.request_deserializer,
            _message_name(handler.request_deserializer),
            self.budget if method in INFERENCE_METHODS else None,
            protocol,
            self._observer if protocol else None,
        )
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, m), response_serializer=serialize
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream, m), response_serializer=serialize
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _stream(handler.stream_unary, m, per_message=False),
                response_serializer=serialize,
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream(handler.stream_stream, m, per_message=method in PER_MESSAGE_STREAMS),
            response_serializer=serialize,
        )


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


@dataclass(frozen=True, slots=True)
class _Method:
    """One method's request: how it parses, its budget (inference methods only), and where a
    refusal is counted (the inference protocols' methods, as requests answered with model "")."""

    parse: Callable[[bytes], Any]
    message_type: str
    budget: ByteBudget | None
    protocol: str
    observer: Observer | None

    def refused(self, code: grpc.StatusCode) -> None:
        if self.observer is not None:
            self.observer.request_finished(self.protocol, "", None, code.name, 0.0)

    def admit(self, size: int) -> tuple[grpc.StatusCode, str] | None:
        """Charge `size` bytes to the budget; the refusal instead, when it is spent."""
        if self.budget is not None:
            try:
                self.budget.acquire(size)
            except QueueFull as exc:
                self.refused(grpc.StatusCode.RESOURCE_EXHAUSTED)
                return grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message
        return None

    def release(self, size: int) -> None:
        if self.budget is not None:
            self.budget.release(size)

    def parsed(self, raw: bytes) -> tuple[Any, tuple[grpc.StatusCode, str] | None]:
        """(the message, None), or (None, the refusal) when it does not parse."""
        try:
            return self.parse(raw), None
        except DecodeError:
            self.refused(grpc.StatusCode.INVALID_ARGUMENT)
            return None, (grpc.StatusCode.INVALID_ARGUMENT, undecodable(self.message_type))

    async def parsed_or_abort(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        message, refusal = self.parsed(raw)
        if refusal is not None:
            await context.abort(*refusal)
        return message


def _unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any], m: _Method
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        size = len(raw)
        refusal = m.admit(size)
        if refusal is not None:
            await context.abort(*refusal)
        try:
            request, refusal = m.parsed(raw)  # not parsed_or_abort: no coroutine per request
            if refusal is not None:
                await context.abort(*refusal)
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
            m.release(size)

    return handle


def _unary_stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any], m: _Method
) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
    if _is_async_generator(behavior):

        async def handle_stream(
            raw: bytes, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            request = await m.parsed_or_abort(raw, context)
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response

        return handle_stream

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await m.parsed_or_abort(raw, context), context)

    return handle


def _stream(
    behavior: Callable[[Any, grpc.aio.ServicerContext], Any], m: _Method, per_message: bool
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]:
    """A request stream's handler; `behavior` returns an async iterator (stream-stream) or a
    coroutine (stream-unary). A per-message stream gets `Incoming` items, its refusals
    answered in the stream; any other ends with the refusal's status."""

    async def messages(
        raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for raw in raws:
            yield await m.parsed_or_abort(raw, context)

    async def incoming(raws: AsyncIterator[bytes]) -> AsyncIterator[Incoming[Any]]:
        async for raw in raws:
            size = len(raw)
            refusal = m.admit(size)
            if refusal is None:
                message, refusal = m.parsed(raw)
                if refusal is None:
                    yield Incoming(message, None, size, m.budget)
                    continue
                m.release(size)
            yield Incoming(None, refusal)

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
