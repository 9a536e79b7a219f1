"""The plain data types the inferd clients take and return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from inferd_client.errors import InferError

__all__ = [
    "ModelMetadata",
    "ModelStatusEvent",
    "StreamRequest",
    "StreamResult",
    "TensorInfo",
    "VersionStatus",
]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor a model declares; -1 in `shape` marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What a model version takes and returns, and how it is served."""

    name: str
    # The version `inputs` and `outputs` describe.
    version: int
    # Every READY version.
    versions: tuple[int, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    # 0: the model does not batch.
    max_batch_size: int
    # max_batch_size, max_queue_delay_us, preferred_batch_sizes (list), max_queue_size,
    # instances, default_timeout_us; empty when the server sent no batching settings.
    batching: dict[str, Any]
    execution_providers: tuple[str, ...]


@dataclass(frozen=True)
class VersionStatus:
    """The state of one model version and its counters since it was loaded."""

    version: int
    # READY, LOADING, UNLOADING, UNLOADED, FAILED or UNKNOWN (the enum name less MODEL_STATE_).
    state: str
    reason: str
    # Timezone-aware (UTC); None when the server did not set it.
    last_change: datetime | None
    # request_success, request_failure, inference_count, execution_count, queue_ns, compute_ns,
    # batch_sizes, stages (per-stage ns summed over stages['count'] successful requests)
    # (ints) and batch_sizes (dict[int, int]: batch rows -> batches executed).
    statistics: dict[str, Any]


@dataclass(frozen=True)
class RepositoryEntry:
    """A model version on disk or known to the server (ModelRepository.Index)."""

    model: str
    version: int
    state: str
    reason: str


@dataclass(frozen=True)
class ModelStatusEvent:
    """A model version's state, as reported by watch()."""

    model: str
    version: int
    state: str
    reason: str
    # Timezone-aware (UTC); None when the server did not set it.
    time: datetime | None


@dataclass(frozen=True, eq=False)
class StreamRequest:
    """One request sent over infer_stream().

    Give each request a distinct `request_id`: results may come back out of order, and the id
    is what matches a result to its request.
    """

    model: str
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] | None = None
    version: int | None = None
    request_id: str = ""
    priority: int = 0
    # 0: none; otherwise the server fails the request after this many microseconds.
    timeout_us: int = 0


@dataclass(frozen=True, eq=False)
class StreamResult:
    """One result from infer_stream(): `outputs` on success, `error` on failure.

    `model` and `version` come from the response; for an error they are the ones requested
    under this request_id (`version` None when none was asked for), or "" / None when the id
    is not one this stream sent.
    """

    request_id: str
    outputs: dict[str, np.ndarray] | None
    error: InferError | None
    model: str
    version: int | None

    @property
    def ok(self) -> bool:
        return self.error is None
