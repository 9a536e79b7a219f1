"""The blocking inferd client."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
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

__all__ = ["InferClient"]

_T = TypeVar("_T")

Metadata = tuple[tuple[str, str], ...] | None


class InferClient:
    """A blocking client for an inferd server; thread-safe.

    Every failed RPC raises an InferError subclass chosen by its status code. Output arrays of
    fixed-size datatypes are read-only views of the received bytes (copy them to write).

    Servers: `target` is "host:port"; several servers are a list of "IP:PORT" (or one string
    of them, comma-separated), and "dns:///NAME:PORT" is every address NAME resolves to. Calls
    to several servers are spread round-robin over those whose grpc.health.v1 status is
    SERVING. `retries` (default 2; 0 or False turns it off): a Predict or ModelStatus call
    answered UNAVAILABLE (a draining or unreachable server) is sent again, up to `retries`
    more times, after 0-50 ms then 0-100 ms...; with several servers, to the next one.

    `connections` (default 1): HTTP/2 connections to each server, each on a gRPC channel of
    its own; calls take the channels in turn (a stream or watch stays on the one it started
    on). A server whose frontend runs as several processes on one port gives each connection
    to one process, so one connection would load only one of them; the same holds for
    replicas behind one address (a Kubernetes Service). With 1, the connection is shared with
    the process's other clients of the same settings, as gRPC does.

    TLS: `root_certificates` (the CA of the server's certificate, PEM bytes or a file path),
    `certificate_chain` and `private_key` (this client's certificate, for mutual TLS),
    `server_name_override` (the name the server's certificate is checked against, when not
    the target's host); or `credentials` (any grpc.ChannelCredentials) instead. See
    docs/tls.md.
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
        self._channels = plan.open(grpc)
        self.target = plan.target
        self.connections = plan.connections
        # Each call takes the next channel's stubs: one C call (about 40 ns, docs/tls.md),
        # atomic under the GIL, so threads need no lock to share the client.
        self._stubs = itertools.cycle([ChannelStubs.of(c) for c in self._channels]).__next__
        self._control_metadata = (
            (("authorization", f"Bearer {control_token}"),) if control_token else ()
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel; calls in flight are cancelled."""
        for channel in self._channels:
            channel.close()

    @staticmethod
    def _call(method: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        try:
            return method(request, timeout=timeout, metadata=trace_metadata())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    # --- Predict -----------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: int | None = None,
        timeout: float | None = None,
        priority: int = 0,
        request_id: str = "",
    ) -> dict[str, np.ndarray]:
        """Run `model` on `inputs`; returns output name -> array (only `outputs`, if given).

        `version` None runs the newest READY version; `timeout` is the gRPC deadline in
        seconds; `priority` 0 is the model's default, 1 the most urgent.
        """
        request = _convert.predict_request(
            model, inputs, outputs, version, request_id, priority, timeout_us=0
        )
        response = self._call(self._stubs().predict, request, timeout)
        return _convert.predict_outputs(response)

    def infer_stream(self, requests: Iterable[StreamRequest]) -> Iterator[StreamResult]:
        """Send `requests` over one stream; yields a StreamResult per request as answered.

        Results may come out of order (match them by request_id). A failed request yields a
        result with `error` set and the stream goes on; only a failure of the whole stream
        raises. `requests` is consumed on a gRPC thread as the server takes it, so it may be
        a lazy generator. The call starts on the first next(); stopping early cancels it.
        """
        return self._stream(requests, trace_metadata())

    def _stream(
        self, requests: Iterable[StreamRequest], metadata: Metadata
    ) -> Iterator[StreamResult]:
        book = StreamBook()
        call = self._stubs().predict_stream(_requests(requests, book), metadata=metadata)
        try:
            for message in call:
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

    def status(
        self, model: str, version: int | None = None, *, timeout: float | None = None
    ) -> list[VersionStatus]:
        """The state and counters of each version of `model` (or just `version`)."""
        request = _convert.status_request(model, version)
        return _convert.version_statuses(
            self._call(self._stubs().get_model_status, request, timeout)
        )

    def metadata(
        self, model: str, version: int | None = None, *, timeout: float | None = None
    ) -> ModelMetadata:
        """Inputs, outputs and serving settings of `version` (None: the newest READY one)."""
        request = _convert.metadata_request(model, version)
        return _convert.model_metadata(
            self._call(self._stubs().get_model_metadata, request, timeout)
        )

    def list_models(self, *, timeout: float | None = None) -> dict[str, list[VersionStatus]]:
        """Model name -> the status of each of its versions, for every model the server knows."""
        request = _convert.list_request()
        return _convert.model_list(self._call(self._stubs().list_models, request, timeout))

    def watch(self, model: str = "") -> Iterator[ModelStatusEvent]:
        """The current state of each version of `model` ("" = every model), then each change.

        Endless until the server ends it; stop iterating (or close the iterator) to cancel.
        """
        return self._watch(model, trace_metadata())

    def _watch(self, model: str, metadata: Metadata) -> Iterator[ModelStatusEvent]:
        call = self._stubs().watch_model_status(_convert.watch_request(model), metadata=metadata)
        try:
            for message in call:
                yield _convert.status_event(message)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    # --- ModelRepository (control plane: needs control_token) -------------------------------

    def _control(self, method: Any, request: Any, timeout: float | None) -> Any:
        metadata = (*(trace_metadata() or ()), *self._control_metadata)
        try:
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def repository_index(self, *, timeout: float | None = None) -> list[RepositoryEntry]:
        """Every model version on disk or known to the server, with its state."""
        response = self._control(self._stubs().repository_index, _convert.index_request(), timeout)
        return _convert.repository_index(response)

    def load_model(self, model: str, *, timeout: float | None = None) -> list[VersionStatus]:
        """Load (or reload) `model` as the repository holds it; returns its versions' status."""
        response = self._control(self._stubs().load, _convert.load_request(model), timeout)
        return _convert.version_statuses(response)

    def unload_model(self, model: str, *, timeout: float | None = None) -> None:
        """Stop serving every version of `model` once what they accepted is answered."""
        self._control(self._stubs().unload, _convert.unload_request(model), timeout)

    # --- Health ------------------------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ("" = the server): 'SERVING', 'NOT_SERVING', ...

        A service the server does not know reads 'SERVICE_UNKNOWN'.
        """
        try:
            status: str = self._stubs().health_check(
                service, timeout=timeout, metadata=trace_metadata()
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise error_from_rpc(exc) from None
        return status


def _requests(
    requests: Iterable[StreamRequest], book: StreamBook
) -> Iterator[predict_pb2.PredictRequest]:
    """The messages for `requests`; an exception ends the stream and is kept in `book`."""
    try:
        for request in requests:
            message = _convert.stream_request(request)
            book.sent(request.request_id, request.model, request.version)
            yield message
    except Exception as exc:
        book.failure = exc
