"""The engine process of `inferd serve --workers N`: the one registry, batcher and runtime of
every model version, fed by the frontend processes over `workers/ipc.py`.

It is a whole `InferenceServer` (model control, metrics endpoint, the drain), listening for gRPC
on a Unix socket that only the frontends use: they forward to it every RPC that is not an
inference (status, metadata, statistics, repository control), so those are answered from the
one registry. Inference requests arrive decoded and validated, as frames, and go straight to
the batcher: requests from every frontend share batches.

Frames from a frontend: ("hello", pid), ("infer", ...), ("cancel", id), ("served", stages).
Frames to it: ("state", ...) whenever routing or health changes, ("result", ...), ("error", ...).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from inferd.app import InferenceServer
from inferd.core.errors import InferdError, Unavailable
from inferd.core.models.registry import LoadedVersion
from inferd.core.observer import Observer
from inferd.core.runtime.session import set_inline_below
from inferd.core.types import InferRequest, ModelSignature, ModelState
from inferd.observability.tracing import remote_context
from inferd.workers.ipc import Link, SharedTensors, pack_tensors, remove_shared, unpack_tensors
from inferd.workers.layout import RunLayout

log = logging.getLogger(__name__)

# Seconds of the engine's grace period kept for its own drain once the frontends are gone.
RESERVE_S = 1.0


class _StateChanges(Observer):
    """Tells the engine when a version changes state: the frontends' routing follows."""

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        if self.engine is not None:
            self.engine.state_changed()


class EngineServer(InferenceServer):
    """The engine's InferenceServer: gRPC on the run's Unix socket, /metrics from every process
    of the server (prometheus-client's multiprocess mode), and the frontends' links."""

    def __init__(self, config: Any, layout: RunLayout, workers: int) -> None:
        set_inline_below(config.engine_inline_below_us * 1e-6)
        changes = _StateChanges()
        super().__init__(config, observer=changes)
        self.layout = layout
        self.engine = Engine(self, layout, workers, config.ipc_shm_threshold_bytes)
        changes.engine = self.engine

    def address(self) -> str:
        return f"unix:{self.layout.engine_grpc}"

    def exposition(self) -> CollectorRegistry:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.layout.metrics))
        registry.register(self.gpu_metrics)
        return registry

    async def start(self) -> None:
        await super().start()
        await self.engine.start()

    async def announce_health(self) -> None:
        # The engine's own health is the frontends' business: they report it, with theirs.
        return

    def log_listening(self) -> None:
        log.info(
            "engine pid %d holds %d model(s) (metrics on port %s)",
            os.getpid(),
            len(self.registry.model_names()),
            self.metrics_port if self.config.metrics_port >= 0 else "off",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Once every frontend has drained and gone (the supervisor stops them first), or at
        the end of the grace period less the engine's reserve: the single-process drain."""
        grace = self.config.grace_period_s if grace is None else grace
        started = time.monotonic()
        self.engine.shutting_down()
        try:
            await asyncio.wait_for(self.engine.frontends_gone(), max(grace - RESERVE_S, 0))
        except TimeoutError:
            log.warning("engine: frontends still connected at the end of their grace period")
        await super().stop(max(grace - (time.monotonic() - started), 0))
        self.engine.close()


class Engine:
    """Serves the frontends' links: routing state out, inference requests in."""

    def __init__(
        self, server: InferenceServer, layout: RunLayout, workers: int, shm_threshold: int
    ) -> None:
        self._server = server
        self._layout = layout
        self._workers = workers
        self._frontends: dict[Link, _Frontend] = {}
        self._shm_threshold = shm_threshold
        self._listener: asyncio.base_events.Server | None = None
        self._announce_scheduled = False
        self._stopping = False
        self._none_left = asyncio.Event()
        # Each loaded version routed, by a number of its own (files reloaded under the same
        # version number are another); what each number ever routed takes, for requests still
        # on their way after it went.
        self._generations: dict[LoadedVersion, int] = {}
        self._generation_numbers = itertools.count(1)
        self._signatures: dict[int, ModelSignature] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        path = self._layout.engine_ipc
        path.unlink(missing_ok=True)
        self._listener = await loop.create_unix_server(self._link, str(path))
        log.info("engine pid %d: listening for %d frontend(s)", os.getpid(), self._workers)

    def _link(self) -> Link:
        frontend = _Frontend(self)
        link = Link(frontend.on_frame, frontend.on_lost)
        frontend.link = link
        return link

    # -- routing and health --------------------------------------------------------------------

    def state_changed(self) -> None:
        if not self._announce_scheduled:
            self._announce_scheduled = True
            asyncio.get_running_loop().call_soon(self._announce)

    def _announce(self) -> None:
        self._announce_scheduled = False
        state = self.state()
        for frontend in self._frontends.values():
            if frontend.pid is not None:
                frontend.link.send(state)

    def state(self) -> tuple[Any, ...]:
        """("state", accepting, serving, {model: [(version, signature, default timeout,
        generation)]}):
        every model the registry lists, with the READY versions a request may go to."""
        registry = self._server.registry
        routes: dict[str, list[tuple[Any, ...]]] = {}
        generations: dict[LoadedVersion, int] = {}
        for name in registry.model_names():
            routes[name] = []
            for v in registry.versions_or_empty(name):
                if v.state is not ModelState.READY or v.loaded is None:
                    continue
                generation = self._generations.get(v.loaded)
                if generation is None:
                    generation = next(self._generation_numbers)
                    self._signatures[generation] = v.loaded.signature
                generations[v.loaded] = generation
                routes[name].append(
                    (v.version, v.loaded.signature, v.loaded.default_timeout, generation)
                )
        self._generations = generations
        hello = sum(1 for f in self._frontends.values() if f.pid is not None)
        serving = registry.accepting and not self._stopping and hello >= self._workers
        return ("state", registry.accepting and not self._stopping, serving, routes)

    def joined(self, frontend: _Frontend) -> None:
        # Answers to it are named for it: if its link drops, what it did not read is removed.
        frontend.shared = SharedTensors(
            self._layout.shm_prefix, self._shm_threshold, owner=f"{os.getpid()}-{frontend.pid}"
        )
        self._frontends[frontend.link] = frontend
        frontend.link.send(self.state())
        log.info("engine: frontend pid %s joined", frontend.pid)
        self.state_changed()

    async def frontends_gone(self) -> None:
        if not self._frontends:
            return
        self._none_left.clear()
        await self._none_left.wait()

    def left(self, frontend: _Frontend) -> None:
        self._frontends.pop(frontend.link, None)
        if frontend.shared is not None:
            remove_shared(frontend.shared.prefix)
        if not self._frontends:
            self._none_left.set()
        for task in list(frontend.tasks.values()):
            task.cancel()
        if frontend.leaving or self._stopping:
            log.info("engine: frontend pid %s stopped", frontend.pid)
        elif frontend.pid is not None:
            log.warning("engine: lost frontend pid %s", frontend.pid)
        self.state_changed()

    def shutting_down(self) -> None:
        self._stopping = True
        self._announce()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for link in list(self._frontends):
            link.close()

    # -- inference -----------------------------------------------------------------------------

    def inputs(self, specs: Any, body: bytes) -> dict[str, Any]:
        """A request's tensors, taken at once: a shared-memory object is unlinked as it is
        mapped, so none is left behind by a request cancelled before it runs."""
        return unpack_tensors(specs, body, self._layout.shm_prefix)

    async def infer(
        self, frontend: _Frontend, rid: int, header: Sequence[Any], inputs: dict[str, Any]
    ) -> None:
        (_, _, model, requested, generation, outputs, request_id, priority, deadline, trace,
         _) = header  # fmt: skip
        link = frontend.link
        try:
            registry = self._server.registry
            target = registry.resolve(model, requested)
            if self._generations.get(target) != generation:
                self._check_same_inputs(model, generation, target)
            request = InferRequest(
                model=model,
                inputs=inputs,
                outputs=outputs,
                version=target.version,
                id=request_id,
                priority=priority,
                deadline=deadline,
                trace_context=remote_context(trace),
            )
            if target.memory is None:
                result = await target.infer(request)
            else:
                charged = target.memory.acquire(sum(a.nbytes for a in inputs.values()), None)
                try:
                    result = await target.infer(request)
                finally:
                    target.memory.release(charged, None)
            out_specs, out_body = pack_tensors(result.outputs.items(), frontend.shared)
            link.send(
                (
                    "result",
                    rid,
                    result.version,
                    result.queue_time,
                    result.compute_time,
                    result.batch_rows,
                    out_specs,
                ),
                out_body,
            )
        except asyncio.CancelledError:
            return
        except InferdError as exc:
            link.send(("error", rid, type(exc).__name__, exc.message))
        except Exception as exc:  # answered INTERNAL; the batcher has logged a model failure
            log.exception("engine: request %d of model '%s' failed", rid, model)
            link.send(("error", rid, "InferenceFailed", f"{type(exc).__name__}: {exc}"))

    def _check_same_inputs(self, model: str, generation: int, target: LoadedVersion) -> None:
        """The frontend checked the request against the loaded version `generation`; if
        another now serves it (a reload, to a new version number or new files under the same
        one), it runs there only if that one takes the same inputs."""
        if self._signatures.get(generation) != target.signature:
            raise Unavailable(
                f"model '{model}' changed to version {target.version} while the request was "
                "on its way; retry"
            )

    def served(self, stages: dict[tuple[str, int], tuple[int, float, float, float]]) -> None:
        """A frontend's own stages of requests it answered: into the version's statistics."""
        registry = self._server.registry
        for (model, number), (count, decode, encode, handler) in stages.items():
            version = registry.get(model, number)
            if version is None:
                continue
            s = version.statistics
            s.decode.add(decode, count)
            s.encode.add(encode, count)
            s.handler.add(handler, count)


class _Frontend:
    """One frontend's link, as the engine sees it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.link: Link
        self.pid: int | None = None
        self.shared: SharedTensors | None = None
        # It said it is stopping: its going is no news.
        self.leaving = False
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def on_frame(self, header: Any, body: bytes) -> None:
        kind = header[0]
        if kind == "infer":
            rid = header[1]
            try:
                inputs = self.engine.inputs(header[-1], body)
            except (OSError, ValueError) as exc:
                self.link.send(("error", rid, "InferenceFailed", f"request tensors: {exc}"))
                return
            task = asyncio.get_running_loop().create_task(
                self.engine.infer(self, rid, header, inputs)
            )
            self.tasks[rid] = task
            task.add_done_callback(lambda _, rid=rid: self.tasks.pop(rid, None))
        elif kind == "cancel":
            task = self.tasks.get(header[1])
            if task is not None:
                task.cancel()
        elif kind == "served":
            self.engine.served(header[1])
        elif kind == "bye":
            self.leaving = True
        elif kind == "hello":
            self.pid = header[1]
            self.engine.joined(self)
        else:
            log.error("engine: unknown frame %r from frontend pid %s", kind, self.pid)

    def on_lost(self, exc: Exception | None) -> None:
        self.engine.left(self)


__all__ = ["Engine", "EngineServer"]
