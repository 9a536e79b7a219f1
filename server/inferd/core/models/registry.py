"""The model registry: which model versions exist, their state, and where a request goes.

Loading a version's files is `models/loading.py`'s; the values are `models/version.py`'s.

A version that was UNLOADED (replaced, removed from the repository, unloaded by request) stays
listed for `retired_retention_s`, then the registry forgets it: it leaves ListModels,
GetModelStatus and the index, and the observer hears UNKNOWN for it (its metric series go).
`forget_retired()` is the sweep; the model controller calls it every poll interval. A FAILED
version stays: its files are still there to fix (once they are gone, the controller unloads
it, and it is retired like the others)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from inferd.core.errors import InvalidInput, ModelNotFound, Unavailable
from inferd.core.models.config import ModelConfig, ModelDefaults
from inferd.core.models.loading import (
    SessionFactory,
    failure_reason,
    load_files,
    onnxruntime_session,
)
from inferd.core.models.repository import MAX_VERSION, validate_model_name
from inferd.core.models.version import LoadedVersion, ModelSession, ModelVersion
from inferd.core.observer import Observer
from inferd.core.types import ModelState

log = logging.getLogger(__name__)

__all__ = [
    "LoadedVersion",
    "ModelRegistry",
    "ModelSession",
    "ModelStatusEvent",
    "ModelVersion",
    "SessionFactory",
    "onnxruntime_session",
]


@dataclass(frozen=True, slots=True)
class ModelStatusEvent:
    model: str
    version: int
    state: ModelState
    reason: str
    # Seconds since the epoch.
    time: float


class _Subscription:
    def __init__(self, model: str) -> None:
        self.model = model
        # None ends the watch (server shutdown).
        self.events: asyncio.Queue[ModelStatusEvent | None] = asyncio.Queue(maxsize=1024)
        self.overflowed = False


class ModelRegistry:
    def __init__(
        self,
        defaults: ModelDefaults | None = None,
        observer: Observer | None = None,
        session_factory: SessionFactory = onnxruntime_session,
        retired_retention_s: float = 300.0,
    ) -> None:
        self.defaults = defaults or ModelDefaults()
        self._observer = observer or Observer()
        self.retired_retention_s = retired_retention_s
        self._session_factory = session_factory
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._subscriptions: set[_Subscription] = set()
        self._accepting = True
        # time.monotonic() of the last request refused because the server is shutting down.
        self.last_refused = 0.0

    # -- loading ---------------------------------------------------------------------------

    async def load_version(
        self,
        name: str,
        number: int,
        path: Path,
        config: ModelConfig,
        fingerprint: str = "",
    ) -> ModelVersion:
        """Load, warm and route one version. If the same version number is READY (its files
        changed), the old one keeps serving until the new one is READY, then drains; if the new
        one fails, the old one keeps serving and its reason says so."""
        if not 0 <= number <= MAX_VERSION:
            # The repository never offers one (1 to 18 digits); the wire could not carry it.
            raise InvalidInput(f"model '{name}': version {number} is not in 0..{MAX_VERSION}")
        existing = self._models.get(name, {}).get(number)
        replacing = existing if existing and existing.state is ModelState.READY else None
        version = ModelVersion(name, number, path, config, fingerprint=fingerprint)
        if replacing is None:
            self._models.setdefault(name, {})[number] = version
        # While new files of a READY version load, that version number stays READY for
        # watchers, metrics and status: only the outcome is news.
        announce = replacing is None
        self._transition(version, ModelState.LOADING, "", notify=announce)
        started = time.perf_counter()
        try:
            loaded = await load_files(
                name,
                number,
                path,
                config,
                self.defaults,
                self._session_factory,
                self._observer,
                version.statistics,
            )
        except Exception as exc:
            reason = failure_reason(exc, path)
            self._transition(
                version, ModelState.FAILED, reason, time.perf_counter() - started, announce
            )
            log.error("model '%s' version %d: %s", name, number, reason)
            if replacing is not None:
                replacing.reason = f"reload failed, serving the previous files: {reason}"
                replacing.failed_fingerprint = fingerprint
            return version
        if not self._accepting:
            await loaded.close()
            self._transition(
                version, ModelState.UNLOADED, "server shut down while loading", notify=announce
            )
            return version
        if replacing is not None:
            self._models[name][number] = version
        version.loaded = loaded
        self._observer.queue_capacity_set(name, number, loaded.policy.max_queue_size)
        self._transition(
            version,
            ModelState.READY,
            "",
            load_time=time.perf_counter() - started,
        )
        log.info(
            "model '%s' version %d READY on %s (max_batch_size=%d) in %.3f s",
            name,
            number,
            ",".join(loaded.providers),
            loaded.signature.max_batch_size,
            time.perf_counter() - started,
        )
        if replacing is not None:
            # Same version number: its old files drain without state events, which would
            # describe the version number now served by the new files.
            await self._close(replacing)
        return version

    async def unload_version(self, name: str, number: int, reason: str = "") -> None:
        """Stop routing to the version, answer everything it accepted, then free it."""
        version = self._models.get(name, {}).get(number)
        if version is None or version.state not in (ModelState.READY, ModelState.FAILED):
            return
        if version.state is ModelState.FAILED:
            self._transition(version, ModelState.UNLOADED, reason)
            return
        self._transition(version, ModelState.UNLOADING, reason)
        await self._unload(version)

    @staticmethod
    async def _close(version: ModelVersion) -> None:
        if version.loaded is not None:
            await version.loaded.close()

    def get(self, name: str, number: int) -> ModelVersion | None:
        return self._models.get(name, {}).get(number)

    @property
    def observer(self) -> Observer:
        """Where the core's events go (the model controller reports repository problems)."""
        return self._observer

    # -- retired versions ------------------------------------------------------------------

    def forget_retired(self, now: float | None = None) -> list[tuple[str, int]]:
        """Forget every version UNLOADED for `retired_retention_s` or longer (`now`:
        time.monotonic()); returns them. Nothing is forgotten while the server shuts down."""
        if not self._accepting:
            return []
        now = time.monotonic() if now is None else now
        expired = [
            v
            for versions in self._models.values()
            for v in versions.values()
            if v.retired_at is not None and now - v.retired_at >= self.retired_retention_s
        ]
        for version in expired:
            self._forget(version)
        return [(v.name, v.version) for v in expired]

    def _forget(self, version: ModelVersion) -> None:
        versions = self._models.get(version.name, {})
        if versions.get(version.version) is not version:
            return
        del versions[version.version]
        if not versions:
            del self._models[version.name]
        self._observer.model_state_changed(
            version.name, version.version, ModelState.UNKNOWN, "forgotten", None
        )

    # -- routing ---------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
        """The READY version a request goes to: the one named, or the newest READY one."""
        if not self._accepting:
            self.last_refused = time.monotonic()
            raise Unavailable("server is shutting down")
        versions = self._models.get(name)
        if versions is None:
            validate_model_name(name)
            raise ModelNotFound(f"model '{name}' is not served")
        if version is not None:
            found = versions.get(version)
            if found is None or found.state is not ModelState.READY or found.loaded is None:
                state = found.state.value if found else "not served"
                ready = sorted(v for v, mv in versions.items() if mv.state is ModelState.READY)
                raise ModelNotFound(
                    f"model '{name}' version {version} is {state}; ready versions: {ready}"
                )
            return found.loaded
        for number in sorted(versions, reverse=True):
            candidate = versions[number]
            if candidate.state is ModelState.READY and candidate.loaded is not None:
                return candidate.loaded
        raise ModelNotFound(f"model '{name}' has no READY version")

    def knows(self, name: str) -> bool:
        return name in self._models

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def versions_or_empty(self, name: str) -> list[ModelVersion]:
        versions = self._models.get(name, {})
        return [versions[v] for v in sorted(versions)]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version the server knows of a model, any state, ascending."""
        versions = self._models.get(name)
        if versions is None:
            validate_model_name(name)
            raise ModelNotFound(f"model '{name}' is not served")
        return [versions[v] for v in sorted(versions)]

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- state changes ---------------------------------------------------------------------

    def _transition(
        self,
        version: ModelVersion,
        state: ModelState,
        reason: str,
        load_time: float | None = None,
        notify: bool = True,
    ) -> None:
        version.state = state
        version.reason = reason
        version.last_change = time.time()
        version.retired_at = time.monotonic() if state is ModelState.UNLOADED else None
        if not notify:
            return
        self._observer.model_state_changed(version.name, version.version, state, reason, load_time)
        event = ModelStatusEvent(version.name, version.version, state, reason, version.last_change)
        for sub in self._subscriptions:
            if sub.model and sub.model != version.name:
                continue
            try:
                sub.events.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True
        if state is ModelState.UNLOADED and self.retired_retention_s <= 0 and self._accepting:
            self._forget(version)

    async def watch(self, model: str = "") -> AsyncIterator[ModelStatusEvent]:
        """The current state of every matching version, then each change as it happens. Ends
        (with OverflowError) if the caller falls more than 1024 events behind."""
        if model:
            self.versions(model)
        sub = _Subscription(model)
        self._subscriptions.add(sub)
        try:
            for name in [model] if model else self.model_names():
                for v in self.versions(name):
                    yield ModelStatusEvent(v.name, v.version, v.state, v.reason, v.last_change)
            while True:
                event = await sub.events.get()
                if event is None:
                    return
                if sub.overflowed:
                    raise OverflowError("status watcher fell more than 1024 events behind")
                yield event
        finally:
            self._subscriptions.discard(sub)

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Refuse new requests, answer every accepted one, then unload every version."""
        self._accepting = False
        # READY, or UNLOADING with its batcher still draining: every version with one open.
        ready = [
            v
            for vs in self._models.values()
            for v in vs.values()
            if v.state in (ModelState.READY, ModelState.UNLOADING)
        ]
        for version in ready:
            self._transition(version, ModelState.UNLOADING, "server shutting down")
        await asyncio.gather(*(self._unload(v) for v in ready))
        # Watches end once the last state change is out, so that shutdown need not wait them.
        for sub in self._subscriptions:
            try:
                sub.events.put_nowait(None)
            except asyncio.QueueFull:
                sub.overflowed = True

    async def _unload(self, version: ModelVersion) -> None:
        await self._close(version)
        self._transition(version, ModelState.UNLOADED, version.reason)
