"""What the core reports about itself. `server/observability/` implements it; the core never
imports Prometheus or OpenTelemetry, so arrows point down only.

Every hook is a no-op here; an implementation overrides the ones it records. Hooks run on the
event loop and must not block.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from server.core.types import ModelState


class RejectReason(enum.Enum):
    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"


class Observer:
    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        """A request was answered without executing it."""

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        """Requests waiting in the version's queue, after a change."""

    def batch_started(self, model: str, version: int, rows: int, in_flight: int) -> None:
        """A batch left the queue for the runtime; `in_flight` counts it."""

    def batch_finished(
        self,
        model: str,
        version: int,
        rows: int,
        queue_times: Sequence[float],
        compute_time: float,
        error: BaseException | None,
        in_flight: int,
    ) -> None:
        """A batch returned (or failed); `queue_times` holds each of its requests' waits."""

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        """A version changed state; `load_time` is set on the LOADING -> READY/FAILED step."""

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        """A frontend answered a request (any outcome), `duration` from arrival to reply."""


class MultiObserver(Observer):
    """Fans every event out to several observers."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        for o in self._observers:
            o.request_rejected(model, version, reason)

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        for o in self._observers:
            o.queue_depth_changed(model, version, depth)

    def batch_started(self, model: str, version: int, rows: int, in_flight: int) -> None:
        for o in self._observers:
            o.batch_started(model, version, rows, in_flight)

    def batch_finished(
        self,
        model: str,
        version: int,
        rows: int,
        queue_times: Sequence[float],
        compute_time: float,
        error: BaseException | None,
        in_flight: int,
    ) -> None:
        for o in self._observers:
            o.batch_finished(model, version, rows, queue_times, compute_time, error, in_flight)

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        for o in self._observers:
            o.model_state_changed(model, version, state, reason, load_time)

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        for o in self._observers:
            o.request_finished(protocol, model, version, code, duration)
