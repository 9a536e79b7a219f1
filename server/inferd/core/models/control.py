"""Model control: what is on disk versus what is served, and when to reconcile the two.

Modes:
- `none`: load what the repository holds at start; never look again.
- `poll`: also rescan every `poll_interval_s`, loading new or changed versions and unloading
  those gone from disk or from the version policy.
- `explicit`: load at start; afterwards only `load(model)` / `unload(model)` (the control RPCs)
  change what is served.

A version directory is loaded only when complete: its files' fingerprint (names, sizes,
modification times, and the model's config) has not changed for `settle_s` across scans, or,
with `require_ready_marker`, it holds a `.ready` file. A writer pausing longer than `settle_s`
defeats the first rule (its half-written file fails to load, FAILED, and is retried when the
file changes again, while the previous version keeps serving); publishing by rename or with
the marker does not depend on timing. New versions are loaded and READY before the
versions they replace drain and unload, so a rollout never leaves a request without a version.

What a scan skips (a directory that is not a version, a model directory with a bad name or
config) is logged once when it appears and reported to the observer whenever the list changes;
it never stops the other models. A model that serves keeps serving what it loaded while its
directory cannot be read or its config is broken.

In poll and explicit modes, the same background task also forgets versions retired longer
than the registry's `retired_retention_s` (`ModelRegistry.forget_retired`).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from inferd.core.errors import FailedPrecondition, ModelNotFound
from inferd.core.models.registry import ModelRegistry
from inferd.core.models.repository import (
    MODEL_PROBLEMS,
    ModelRepository,
    ModelSource,
    validate_model_name,
)
from inferd.core.observer import RepositoryProblem
from inferd.core.types import ModelState

log = logging.getLogger(__name__)

READY_MARKER = ".ready"
_CONFIG_FILES = ("config.toml", "config.pbtxt")


class ControlMode(enum.Enum):
    NONE = "none"
    POLL = "poll"
    EXPLICIT = "explicit"


def fingerprint(version_dir: Path) -> str:
    """What a version's files look like now. Blocks on file I/O."""
    digest = hashlib.sha256()
    model_dir = version_dir.parent
    paths = [p for p in sorted(version_dir.rglob("*")) if p.is_file()]
    paths += [model_dir / name for name in _CONFIG_FILES if (model_dir / name).is_file()]
    warmup = model_dir / "warmup"
    if warmup.is_dir():
        paths += [p for p in sorted(warmup.iterdir()) if p.is_file()]
    for path in paths:
        stat = path.stat()
        digest.update(
            f"{path.relative_to(model_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """A model version on disk and/or in the registry."""

    model: str
    version: int
    state: ModelState
    reason: str


class ModelController:
    def __init__(
        self,
        registry: ModelRegistry,
        repository: ModelRepository,
        mode: ControlMode = ControlMode.NONE,
        poll_interval_s: float = 5.0,
        require_ready_marker: bool = False,
        settle_s: float = 1.0,
    ) -> None:
        self.registry = registry
        self.repository = repository
        self.mode = mode
        self.poll_interval_s = poll_interval_s
        self.require_ready_marker = require_ready_marker
        self.settle_s = settle_s
        # Per (model, version): the fingerprint of its files, and since when (monotonic) scans
        # have seen exactly that.
        self._seen: dict[tuple[str, int], tuple[str, float]] = {}
        # Versions seen on disk but not complete yet.
        self._pending: set[tuple[str, int]] = set()
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        # What the last scan skipped (each logged once, when it appeared).
        self._problems: frozenset[RepositoryProblem] = frozenset()
        # (model, error) of reconciles that raised, logged once each.
        self._failures: set[tuple[str, str]] = set()

    async def start(self) -> None:
        """Load the repository as it is now (trusted complete at start), then, in poll mode,
        keep watching it; in poll and explicit modes, forget retired versions as they expire."""
        await self.reconcile(trust_unseen=True)
        if self.mode is not ControlMode.NONE:
            self._poller = asyncio.get_running_loop().create_task(
                self._poll_forever(), name="model-control-poll"
            )

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                if self.mode is ControlMode.POLL:
                    await self.reconcile()
                self.registry.forget_retired()
            except Exception:
                log.exception("repository poll failed")

    @property
    def problems(self) -> frozenset[RepositoryProblem]:
        """What the last scan skipped."""
        return self._problems

    async def reconcile(self, only: str | None = None, trust_unseen: bool = False) -> None:
        """Make the registry serve what the repository holds (for one model, or all).

        `trust_unseen` loads versions seen for the first time without waiting for a second
        scan (the start-up load); a marker, when required, is still required."""
        async with self._lock:
            sources, problems = await asyncio.to_thread(self.repository.scan)
            self._note_problems(problems)
            # A model whose directory is there but unusable keeps what it serves, as a failed
            # load would: only its removal from the repository retires it.
            held = {p.model for p in problems if p.kind in MODEL_PROBLEMS - {"no_version"}}
            by_name = {s.name: s for s in sources}
            names = [only] if only else sorted(set(by_name) | set(self.registry.model_names()))
            for name in names:
                if name in held:
                    continue
                try:
                    await self._reconcile_model(name, by_name.get(name), trust_unseen)
                    self._failures = {f for f in self._failures if f[0] != name}
                except Exception as exc:
                    # One model's trouble (an unreadable version directory...) is its own.
                    key = (name, repr(exc))
                    if key not in self._failures:
                        self._failures.add(key)
                        log.exception("model '%s': reconciling with the repository failed", name)

    def _note_problems(self, problems: list[RepositoryProblem]) -> None:
        """Log each problem once, when it appears; tell the observer when the list changed."""
        current = frozenset(problems)
        if current == self._problems:
            return
        for problem in sorted(current - self._problems, key=lambda p: p.path):
            if problem.kind in MODEL_PROBLEMS:
                log.error("model '%s' skipped: %s", problem.model, problem.reason)
            else:
                log.warning(
                    "model '%s': '%s' skipped: %s", problem.model, problem.path, problem.reason
                )
        self._problems = current
        self.registry.observer.repository_problems_changed(
            sorted(current, key=lambda p: (p.path, p.kind))
        )

    async def _reconcile_model(
        self, name: str, source: ModelSource | None, trust_unseen: bool
    ) -> None:
        wanted = source.selected_versions() if source else {}
        if source is not None:
            await self._load_complete(source, wanted, trust_unseen)
        # Retire what is no longer wanted, oldest first, but only while more versions are READY
        # than the policy wants: a replacement still settling, loading or FAILED keeps the
        # version it would replace serving, so a bad publish never lowers what is served.
        known = self.registry.versions_or_empty(name)
        ready_wanted = sum(1 for v in known if v.version in wanted and v.state is ModelState.READY)
        unwanted = [v for v in known if v.version not in wanted]
        surplus = ready_wanted + sum(1 for v in unwanted if v.state is ModelState.READY)
        surplus -= len(wanted)
        for version in unwanted:
            on_disk = source is not None and version.version in source.versions
            why = "not in version policy" if on_disk else "removed from the repository"
            if version.state is ModelState.FAILED:
                await self.registry.unload_version(name, version.version, why)
            elif version.state is ModelState.READY and surplus > 0:
                await self.registry.unload_version(name, version.version, why)
                surplus -= 1
        for key in [k for k in self._seen if k[0] == name and k[1] not in wanted]:
            del self._seen[key]
            self._pending.discard(key)

    async def _load_complete(
        self, source: ModelSource, wanted: dict[int, Path], trust_unseen: bool
    ) -> None:
        """Load each wanted version whose files are complete, unless those files are what it
        serves already or what failed already."""
        name = source.name
        for number, path in sorted(wanted.items()):
            current = await asyncio.to_thread(fingerprint, path.parent)
            previous = self._seen.get((name, number))
            changed = previous is None or previous[0] != current
            if changed:
                self._seen[(name, number)] = (current, time.monotonic())
            trusted = previous is None and trust_unseen
            if not await self._complete(name, number, path.parent, changed, trusted):
                self._pending.add((name, number))
                continue
            self._pending.discard((name, number))
            served = self.registry.get(name, number)
            if served is not None and served.state in (ModelState.LOADING, ModelState.UNLOADING):
                continue
            if served is not None and served.state in (ModelState.READY, ModelState.FAILED):
                if current in (served.fingerprint, served.failed_fingerprint):
                    continue
            await self.registry.load_version(name, number, path, source.config, current)

    async def _complete(
        self, name: str, number: int, version_dir: Path, changed: bool, trusted: bool
    ) -> bool:
        """Marker mode: the marker exists. Otherwise: trusted (seen first at start), or a
        second scan found the files unchanged and they have been for settle_s."""
        if self.require_ready_marker:
            return await asyncio.to_thread((version_dir / READY_MARKER).is_file)
        if trusted:
            return True
        if changed:
            return False
        _, since = self._seen[(name, number)]
        return time.monotonic() - since >= self.settle_s

    # -- explicit control ------------------------------------------------------------------

    def _require_explicit(self) -> None:
        if self.mode is not ControlMode.EXPLICIT:
            raise FailedPrecondition(
                f"model control mode is '{self.mode.value}'; load and unload requests need "
                "model_control = 'explicit'"
            )

    async def load(self, name: str) -> None:
        """Load (or reload) a model's versions as the repository holds them now. The files
        must have settled: unchanged for settle_s."""
        self._require_explicit()
        validate_model_name(name)
        if not (self.repository.root / name).is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository")
        await self.reconcile(only=name, trust_unseen=False)
        if any(key[0] == name for key in self._pending):
            await asyncio.sleep(self.settle_s)
            await self.reconcile(only=name, trust_unseen=False)
        skipped = sorted(
            p.reason for p in self._problems if p.model == name and p.kind in MODEL_PROBLEMS
        )
        if skipped:
            # Whatever it served before keeps serving (see reconcile).
            raise FailedPrecondition(f"model '{name}' is skipped: {'; '.join(skipped)}")
        versions = self.registry.versions_or_empty(name)
        if not any(v.state is ModelState.READY for v in versions):
            reasons = "; ".join(f"v{v.version}: {v.reason}" for v in versions if v.reason)
            raise FailedPrecondition(
                f"model '{name}' has no READY version after loading: {reasons or 'none on disk'}"
            )

    async def unload(self, name: str) -> None:
        self._require_explicit()
        validate_model_name(name)
        versions = self.registry.versions_or_empty(name)
        if not versions:
            raise ModelNotFound(f"model '{name}' is not served")
        async with self._lock:
            for v in versions:
                await self.registry.unload_version(name, v.version, "unloaded by request")
            for key in [k for k in self._seen if k[0] == name]:
                del self._seen[key]
                self._pending.discard(key)

    async def index(self) -> list[IndexEntry]:
        """Every model version on disk or known to the registry, with its state."""
        sources, _ = await asyncio.to_thread(self.repository.scan)
        entries: dict[tuple[str, int], IndexEntry] = {}
        for source in sources:
            for number in source.versions:
                entries[(source.name, number)] = IndexEntry(
                    source.name, number, ModelState.UNKNOWN, "on disk, not loaded"
                )
        for name in self.registry.model_names():
            for v in self.registry.versions(name):
                entries[(name, v.version)] = IndexEntry(name, v.version, v.state, v.reason)
        return [entries[k] for k in sorted(entries)]
