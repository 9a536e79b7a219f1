"""One version of one model: its lifecycle (`ModelVersion`) and, once its load succeeded, what
serves it (`LoadedVersion`, made by `models/loading.py`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from inferd.core.admission import RequestMemory
from inferd.core.batching.batcher import Batcher, BatchExecutor
from inferd.core.batching.policy import BatchingPolicy
from inferd.core.models.config import ModelConfig
from inferd.core.statistics import VersionStatistics
from inferd.core.types import InferRequest, InferResult, ModelSignature, ModelState


class ModelSession(BatchExecutor, Protocol):
    """What a loaded version needs of its runtime (OnnxRuntimeSession, or a fake in tests).
    The session derives the signature from its graph: it needs it itself (batch buckets, IO
    binding, a TensorRT profile), and nothing derives it again."""

    providers: tuple[str, ...]
    signature: ModelSignature

    def close(self) -> None: ...


@dataclass(frozen=True, eq=False, slots=True)
class LoadedVersion:
    """A version whose load succeeded: everything a request needs, none of it optional.

    The registry's `resolve` hands it to the frontends. It stays with its `ModelVersion` after
    an unload, closed (its batcher refuses, its session is freed), as the record of what the
    version served."""

    name: str
    version: int
    path: Path
    config: ModelConfig
    statistics: VersionStatistics
    session: ModelSession
    signature: ModelSignature
    policy: BatchingPolicy
    batcher: Batcher
    default_timeout: float | None
    """Seconds for requests that carry neither a timeout nor a deadline; None: no limit."""
    providers: tuple[str, ...]
    memory: RequestMemory | None = None
    """Admission by estimated memory, when the config asks for it (`core/admission.py`)."""

    async def infer(self, request: InferRequest) -> InferResult:
        return await self.batcher.submit(request)

    async def close(self) -> None:
        """Answer everything the batcher accepted, then free the session. Safe to repeat."""
        await self.batcher.close()
        await asyncio.to_thread(self.session.close)


@dataclass(eq=False)
class ModelVersion:
    """One version of one model as the registry tracks it: where its files are, its state, and
    its LoadedVersion from the moment it is READY."""

    name: str
    version: int
    path: Path
    config: ModelConfig
    state: ModelState = ModelState.UNKNOWN
    reason: str = ""
    last_change: float = field(default_factory=time.time)
    statistics: VersionStatistics = field(default_factory=VersionStatistics)
    # What the files looked like when loaded (see models/control.py); a failed reload remembers
    # its files so that only a further change retries it.
    fingerprint: str = ""
    failed_fingerprint: str = ""
    loaded: LoadedVersion | None = None
    """Set when the version goes READY; None while loading, and for good if the load failed."""
    retired_at: float | None = None
    """time.monotonic() when it went UNLOADED: the registry forgets it `retired_retention_s`
    later."""
