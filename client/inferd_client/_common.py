"""What the sync and async clients share apart from message conversion."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

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
