"""The asyncio inferd client (grpc.aio)."""

# `timeout` is the gRPC deadline sent to the server, not a local wait: asyncio.timeout() would
# not tell the server when to give up.
# ruff: noqa: ASYNC109

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import grpc
import grpc.aio
import numpy as np

from inferd_client import _convert
from inferd_client._channel import DEFAULT_RETRIES, Pem, plan_channel
from inferd_client._common import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    ChannelStubs,
    StreamBook,
)
from inferd_client._tracing import trace_metadata
from inferd_client.errors import error_from_rpc
from inferd_client.types import (
    ModelMetadata,
    ModelStatusEvent,
    RepositoryEntry,
    StreamRequest,
    StreamResult,
    VersionStatus,
)
from inferd_wire.proto.inferd.v1 import predict_pb2

__all__ = ["AsyncInferClient"]

Metadata = tuple[tuple[str, str], ...] | None


class AsyncInferClient:
    """An asyncio client for an inferd server; the same API as InferClient, awaited.

    Create it inside the event loop that uses it (e.g. `async with AsyncInferClient() as c`).
    Servers, retries, connections and TLS are set as for InferClient.
    """

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        control_token: str | None = None,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        server_name_override: str | None = None,
        retries: int | bool = DEFAULT_RETRIES,
        connections: int = 1,
    ) -> None:
        plan = plan_channel(
            target,
            max_message_bytes=max_message_bytes,
            options=options,
            credentials=credentials,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            server_name_override=server_name_override,
            retries=retries,
            connections=connections,
        )
        self._channels = plan.open(grpc.aio)
        self.target = plan.target
        self.connections = plan.connections
        # Each call takes the next channel's stubs (see InferClient): one C call, no lock.
        self._stubs = itertools.cycle([ChannelStubs.of(c) for c in self._channels]).__next__
        self._control_metadata = (
            (("authorization", f"Bearer {control_token}"),) if control_token else ()
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        for channel in self._channels:
            await channel.close()

    @staticmethod
    async def _call(method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=timeout, metadata=trace_metadata())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    # --- Predict -----------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: int | None = None,
        timeout: float | None = None,
        priority: int = 0,
        request_id: str = "",
    ) -> dict[str, np.ndarray]:
        """Run `model` on `inputs`; see InferClient.infer."""
        request = _convert.predict_request(
            model, inputs, outputs, version, request_id, priority, timeout_us=0
        )
        response = await self._call(self._stubs().predict, request, timeout)
        return _convert.predict_outputs(response)

    def infer_stream(
        self, requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest]
    ) -> AsyncIterator[StreamResult]:
        """Send `requests` over one stream; an async iterator of results as they are answered.

        See InferClient.infer_stream. A sync iterable is iterated on the event loop, so it must
        not block. Stopping early cancels the call once the iterator is closed
        (`contextlib.aclosing` closes it at once).
        """
        return self._stream(requests, trace_metadata())

    async def _stream(
        self,
        requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest],
        metadata: Metadata,
    ) -> AsyncIterator[StreamResult]:
        book = StreamBook()
        call = self._stubs().predict_stream(_requests(requests, book), metadata=metadata)
        try:
            async for message in call:
                if book.failure is not None:
                    break
                yield _convert.stream_result(message, book.answered(message.id))
        except grpc.RpcError as exc:
            if book.failure is None:
                raise error_from_rpc(exc) from None
        finally:
            call.cancel()
        if book.failure is not None:
            raise book.failure

    # --- ModelStatus -------------------------------------------------------------------------

    async def status(
        self, model: str, version: int | None = None, *, timeout: float | None = None
    ) -> list[VersionStatus]:
        """The state and counters of each version of `model` (or just `version`)."""
        request = _convert.status_request(model, version)
        response = await self._call(self._stubs().get_model_status, request, timeout)
        return _convert.version_statuses(response)

    async def metadata(
        self, model: str, version: int | None = None, *, timeout: float | None = None
    ) -> ModelMetadata:
        """Inputs, outputs and serving settings of `version` (None: the newest READY one)."""
        request = _convert.metadata_request(model, version)
        response = await self._call(self._stubs().get_model_metadata, request, timeout)
        return _convert.model_metadata(response)

    async def list_models(self, *, timeout: float | None = None) -> dict[str, list[VersionStatus]]:
        """Model name -> the status of each of its versions, for every model the server knows."""
        response = await self._call(self._stubs().list_models, _convert.list_request(), timeout)
        return _convert.model_list(response)

    def watch(self, model: str = "") -> AsyncIterator[ModelStatusEvent]:
        """The current state of each version of `model` ("" = every model), then each change."""
        return self._watch(model, trace_metadata())

    async def _watch(self, model: str, metadata: Metadata) -> AsyncIterator[ModelStatusEvent]:
        call = self._stubs().watch_model_status(_convert.watch_request(model), metadata=metadata)
        try:
            async for message in call:
                yield _convert.status_event(message)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    # --- ModelRepository (control plane: needs control_token) -------------------------------

    async def _control(self, method: Any, request: Any, timeout: float | None) -> Any:
        metadata = (*(trace_metadata() or ()), *self._control_metadata)
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def repository_index(self, *, timeout: float | None = None) -> list[RepositoryEntry]:
        """Every model version on disk or known to the server, with its state."""
        response = await self._control(
            self._stubs().repository_index, _convert.index_request(), timeout
        )
        return _convert.repository_index(response)

    async def load_model(self, model: str, *, timeout: float | None = None) -> list[VersionStatus]:
        """Load (or reload) `model` as the repository holds it; returns its versions' status."""
        response = await self._control(self._stubs().load, _convert.load_request(model), timeout)
        return _convert.version_statuses(response)

    async def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Stop serving every version of `model` once what they accepted is answered."""
        await self._control(self._stubs().unload, _convert.unload_request(model), timeout)

    # --- Health ------------------------------------------------------------------------------

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" = the server); see InferClient.health."""
        try:
            status: str = await self._stubs().health_check(
                service, timeout=timeout, metadata=trace_metadata()
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise error_from_rpc(exc) from None
        return status


async def _requests(
    requests: AsyncIterable[StreamRequest] | Iterable[StreamRequest], book: StreamBook
) -> AsyncIterator[predict_pb2.PredictRequest]:
    """The messages for `requests`; an exception ends the stream and is kept in `book`."""
    try:
        if isinstance(requests, AsyncIterable):
            async for request in requests:
                message = _convert.stream_request(request)
                book.sent(request.request_id, request.model, request.version)
                yield message
        else:
            for request in requests:
                message = _convert.stream_request(request)
                book.sent(request.request_id, request.model, request.version)
                yield message
    except Exception as exc:
        book.failure = exc
