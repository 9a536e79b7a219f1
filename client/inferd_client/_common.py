"""What the sync and async clients share apart from message conversion."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from inferd_client._health import CHECK_METHOD, decode_health_response, encode_health_request
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2_grpc,
    model_status_pb2_grpc,
    predict_pb2_grpc,
)

DEFAULT_TARGET = "127.0.0.1:8001"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SIZE_OPTIONS = ("grpc.max_send_message_length", "grpc.max_receive_message_length")


def channel_options(
    max_message_bytes: int, options: Iterable[tuple[str, Any]] | None
) -> list[tuple[str, Any]]:
    """The message size limits, then `options`; an option in `options` replaces a limit."""
    extra = list(options or ())
    given = {key for key, _ in extra}
    return [(key, max_message_bytes) for key in _SIZE_OPTIONS if key not in given] + extra


@dataclass(frozen=True, slots=True)
class ChannelStubs:
    """Every RPC the clients make, bound to one channel (a grpc or a grpc.aio one)."""

    predict: Any
    predict_stream: Any
    get_model_status: Any
    get_model_metadata: Any
    list_models: Any
    watch_model_status: Any
    repository_index: Any
    load: Any
    unload: Any
    health_check: Any

    @classmethod
    def of(cls, channel: Any) -> ChannelStubs:
        predict = predict_pb2_grpc.PredictStub(channel)
        status = model_status_pb2_grpc.ModelStatusStub(channel)
        repository = model_repository_pb2_grpc.ModelRepositoryStub(channel)
        return cls(
            predict=predict.Predict,
            predict_stream=predict.PredictStream,
            get_model_status=status.GetModelStatus,
            get_model_metadata=status.GetModelMetadata,
            list_models=status.ListModels,
            watch_model_status=status.WatchModelStatus,
            repository_index=repository.Index,
            load=repository.Load,
            unload=repository.Unload,
            health_check=channel.unary_unary(
                CHECK_METHOD,
                request_serializer=encode_health_request,
                response_deserializer=decode_health_response,
            ),
        )


class StreamBook:
    """Bookkeeping for one PredictStream call.

    Remembers the (model, version) sent under each request id, so that an error result, which
    carries only the id, can say which model it was for; and keeps an exception raised while
    iterating the caller's requests, to re-raise it to the caller instead of a bare CANCELLED.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the sync client sends and receives on two threads
        self._sent: dict[str, deque[tuple[str, int | None]]] = {}
        self.failure: Exception | None = None

    def sent(self, request_id: str, model: str, version: int | None) -> None:
        with self._lock:
            self._sent.setdefault(request_id, deque()).append((model, version))

    def answered(self, request_id: str) -> tuple[str, int | None] | None:
        """The oldest unanswered (model, version) sent under `request_id`, now answered."""
        with self._lock:
            waiting = self._sent.get(request_id)
            if not waiting:
                return None
            requested = waiting.popleft()
            if not waiting:
                del self._sent[request_id]
            return requested
