"""What the core reports about itself. `server/inferd/observability/` implements it; the core never
imports Prometheus or OpenTelemetry, so arrows point down only.

Every hook is a no-op here; an implementation overrides the ones it records. Hooks run on the
event loop and must not block.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from inferd.core.types import ModelState


class RejectReason(enum.Enum):
    QUEUE_FULL = "queue_full"
    SHED = "shed"  # would not finish before its deadline: refused on arrival
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    INVALID = "invalid"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class BatchReport:
    """One executed (or failed) batch."""

    model: str
    version: int
    rows: int
    # Per request of the batch, in batch order: its wait in the queue (seconds) and the trace
    # context its frontend attached (opaque to the core).
    queue_times: tuple[float, ...]
    trace_contexts: tuple[Any, ...]
    # Seconds: the whole execution, and the runtime's split of it.
    compute_time: float
    input_time: float
    infer_time: float
    output_time: float
    error: BaseException | None
    # Batches of this version still executing after this one.
    in_flight: int
    # Per request: True when its caller gave up (deadline, cancel) while the batch executed, so
    # it is not answered with outputs.
    abandoned: tuple[bool, ...] = ()
    # A failed batch whose requests will each run again alone: its failure is nobody's answer.
    retried: bool = False

    @property
    def requests(self) -> int:
        return len(self.queue_times)


@dataclass(frozen=True, slots=True)
class RepositoryProblem:
    """Something a scan of the model repository skipped (`models/repository.py` finds them).
    Names and paths are printable: bytes that are not UTF-8 show as `\\xNN`."""

    model: str
    """The model directory's name."""
    path: str
    """Relative to the repository root: the model directory, or the entry inside it."""
    kind: str
    """`invalid_name`, `unreadable`, `config`, `no_version`: the whole model is skipped (one
    that serves keeps serving what it loaded); `not_a_version`, `duplicate_version`: only that
    entry is."""
    reason: str


class Observer:
    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        """A request was answered without executing it."""

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        """Requests waiting in the version's queue, after a change."""

    def queue_capacity_set(self, model: str, version: int, capacity: int) -> None:
        """The version's max_queue_size, once it is READY."""

    def batch_started(self, model: str, version: int, rows: int, in_flight: int) -> None:
        """A batch left the queue for the runtime; `in_flight` counts it."""

    def batch_finished(self, report: BatchReport) -> None:
        """A batch returned, or failed (`report.error`)."""

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        """A version changed state; `load_time` is set on the LOADING -> READY/FAILED step.
        UNKNOWN: the registry forgot the version (UNLOADED for `retired_retention_s`)."""

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        """A frontend answered a request (any outcome), `duration` from arrival to reply."""

    def repository_problems_changed(self, problems: Sequence[RepositoryProblem]) -> None:
        """Everything the latest repository scan skipped, after a scan whose list differs from
        the one before (empty once all are fixed)."""


class MultiObserver(Observer):
    """Fans every event out to several observers.

    Each hook calls only the observers that implement it: most hooks fire per request or per
    batch, and most observers record a few of them (the rest are the base class's no-ops)."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self._observers = tuple(observers)

        def implementing(hook: str) -> tuple[Callable[..., None], ...]:
            base = getattr(Observer, hook)
            return tuple(
                getattr(o, hook) for o in self._observers if getattr(type(o), hook) is not base
            )

        self._request_rejected = implementing("request_rejected")
        self._queue_depth_changed = implementing("queue_depth_changed")
        self._queue_capacity_set = implementing("queue_capacity_set")
        self._batch_started = implementing("batch_started")
        self._batch_finished = implementing("batch_finished")
        self._model_state_changed = implementing("model_state_changed")
        self._request_finished = implementing("request_finished")
        self._repository_problems_changed = implementing("repository_problems_changed")

    def request_rejected(self, model: str, version: int, reason: RejectReason) -> None:
        for hook in self._request_rejected:
            hook(model, version, reason)

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        for hook in self._queue_depth_changed:
            hook(model, version, depth)

    def queue_capacity_set(self, model: str, version: int, capacity: int) -> None:
        for hook in self._queue_capacity_set:
            hook(model, version, capacity)

    def batch_started(self, model: str, version: int, rows: int, in_flight: int) -> None:
        for hook in self._batch_started:
            hook(model, version, rows, in_flight)

    def batch_finished(self, report: BatchReport) -> None:
        for hook in self._batch_finished:
            hook(report)

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        for hook in self._model_state_changed:
            hook(model, version, state, reason, load_time)

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        for hook in self._request_finished:
            hook(protocol, model, version, code, duration)

    def repository_problems_changed(self, problems: Sequence[RepositoryProblem]) -> None:
        for hook in self._repository_problems_changed:
            hook(problems)
