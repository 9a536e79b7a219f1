"""A frontend process of `inferd serve --workers N`: gRPC, parsing, validation, decoding and
encoding, on the port it shares with the other frontends (SO_REUSEPORT: the kernel spreads
connections over them).

Inference requests are checked against the engine's routing table (pushed whenever a version
changes state) and sent to the engine over `workers/ipc.py`; every other RPC (status, metadata,
statistics, repository control) is forwarded unparsed to the engine's own gRPC socket, so that
it is answered from the one registry. Health is SERVING only while the engine says that it and
every frontend are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from inferd.api.wire import INFERENCE_METHODS
from inferd.app import SERVICE_NAMES, InferenceServer
from inferd.core.errors import InferenceFailed, ModelNotFound, Unavailable
from inferd.core.models.loading import SessionFactory
from inferd.core.models.repository import validate_model_name
from inferd.core.types import InferRequest, InferResult, ModelSignature
from inferd.observability.tracing import portable_context
from inferd.observability.worker_metrics import (
    MIRROR_INTERVAL_S,
    AnsweredHere,
    CollectorMirror,
)
from inferd.workers.forwarding import EngineProxy
from inferd.workers.ipc import (
    Link,
    SharedTensors,
    error_of,
    pack_tensors,
    remove_shared,
    unpack_tensors,
)
from inferd.workers.layout import RunLayout

log = logging.getLogger(__name__)

# Services a frontend answers itself; the rest of every service goes to the engine.
_LOCAL_SERVICES = ("/grpc.health.v1.", "/grpc.reflection.")
# How often a frontend's own request stages reach the engine's statistics.
SERVED_INTERVAL = 0.1
RECONNECT_INTERVAL = 0.1


class FrontendServer(InferenceServer):
    reuse_port = True

    def __init__(self, config: Any, layout: RunLayout, index: int) -> None:
        self.layout = layout
        self.client = EngineClient(layout, config.ipc_shm_threshold_bytes, index)
        super().__init__(config, observer=AnsweredHere())
        self.client.on_health = self._health_changed
        self.client.on_reconnected = self._engine_back
        self._proxy: EngineProxy | None = None
        self._mirroring: asyncio.Task[None] | None = None

    def backend(self, session_factory: SessionFactory) -> tuple[Any, Any]:
        return self.client.registry, self.client

    def route(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        if method in INFERENCE_METHODS or method.startswith(_LOCAL_SERVICES):
            return None
        if self._proxy is None:
            self._proxy = EngineProxy(f"unix:{self.layout.engine_grpc}")
        return self._proxy.handler(method, handler)

    async def announce_health(self) -> None:
        await self._set_health(self.client.serving)

    def log_listening(self) -> None:
        log.info("frontend pid %d listening on %s:%d", os.getpid(), self.config.host, self.port)

    def _engine_back(self) -> None:
        """A new engine: forwarded RPCs go to it at once (the old channel would wait out its
        reconnect backoff)."""
        if self._proxy is not None:
            self._proxy.reset()

    def _health_changed(self, serving: bool) -> None:
        asyncio.get_running_loop().create_task(self._set_health(serving))

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def start(self) -> None:
        await super().start()
        mirror = CollectorMirror([self.admission_metrics, self.tls_metrics])
        self._mirroring = asyncio.get_running_loop().create_task(_mirror(mirror))

    async def stop(self, grace: float | None = None) -> None:
        await super().stop(grace)
        if self._mirroring is not None:
            self._mirroring.cancel()
        self.client.close()
        if self._proxy is not None:
            await self._proxy.close()


async def _mirror(mirror: CollectorMirror) -> None:
    try:
        while True:
            mirror.update()
            await asyncio.sleep(MIRROR_INTERVAL_S)
    finally:
        mirror.update()


class RemoteVersion:
    """A READY version as a frontend sees it: what validating a request needs, and `infer`,
    which sends the request to the engine."""

    __slots__ = (
        "_client",
        "default_timeout",
        "generation",
        "memory",
        "name",
        "requested",
        "signature",
        "statistics",
        "version",
    )

    def __init__(
        self,
        client: EngineClient,
        name: str,
        version: int,
        signature: ModelSignature,
        default_timeout: float | None,
        requested: int | None,
        generation: int,
    ) -> None:
        self._client = client
        # The engine's number for the loaded version this is (new files, new number).
        self.generation = generation
        self.name = name
        self.version = version
        self.signature = signature
        self.default_timeout = default_timeout
        # Memory admission is the engine's, where every frontend's requests meet.
        self.memory = None
        self.requested = requested
        self.statistics = _ServedStages(client, (name, version))

    async def infer(self, request: InferRequest) -> InferResult:
        return await self._client.infer(self, request)


class _ServedStages:
    """The frontend's share of a version's statistics: the stages of each request it
    answered, sent to the engine in bulk (`EngineClient.served`)."""

    __slots__ = ("_client", "_key")

    def __init__(self, client: EngineClient, key: tuple[str, int]) -> None:
        self._client = client
        self._key = key

    def request_served(self, decode: float, encode: float, handler: float) -> None:
        self._client.served(self._key, decode, encode, handler)


class Refusals:
    """When each frontend last refused a request because the server is stopping, in a small
    file every frontend maps (slot `index` is this one's). A draining frontend waits until no
    frontend has refused one for a while (`InferenceServer._quiesce`): a client spreads its
    retries over its connections, so one frontend's quiet is not the server's, and a call
    that reaches a frontend as its transport stops ends CANCELLED (grpc/grpc#41785)."""

    SLOTS = 256  # the most `workers` allows

    def __init__(self, path: Path, index: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8 * self.SLOTS:
                os.ftruncate(fd, 8 * self.SLOTS)
            self._times = memoryview(mmap.mmap(fd, 8 * self.SLOTS)).cast("d")
        finally:
            os.close(fd)
        self._index = index

    def refused(self, now: float) -> None:
        self._times[self._index] = now

    @property
    def last(self) -> float:
        return max(self._times)


class RemoteRegistry:
    """The engine's routing table, as `DataPlane` asks a registry for it."""

    def __init__(self, client: EngineClient, refusals: Refusals) -> None:
        self._client = client
        # model -> version -> (the version named, the version as the default)
        self._routes: dict[str, dict[int, tuple[RemoteVersion, RemoteVersion]]] = {}
        self._stopping = False
        self._refusals = refusals

    @property
    def last_refused(self) -> float:
        """time.monotonic() of the last request any frontend refused while stopping."""
        return self._refusals.last

    def update(
        self, routes: dict[str, list[tuple[int, ModelSignature, float | None, int]]]
    ) -> None:
        c = self._client
        self._routes = {
            name: {
                number: (
                    RemoteVersion(c, name, number, signature, timeout, number, generation),
                    RemoteVersion(c, name, number, signature, timeout, None, generation),
                )
                for number, signature, timeout, generation in versions
            }
            for name, versions in routes.items()
        }

    @property
    def accepting(self) -> bool:
        return not self._stopping and self._client.accepting

    def resolve(self, name: str, version: int | None = None) -> RemoteVersion:
        """As `ModelRegistry.resolve`, from the engine's latest routing table."""
        if not self.accepting:
            self._refusals.refused(time.monotonic())
            raise Unavailable(
                "server is shutting down" if self._stopping else "the engine is not available"
            )
        versions = self._routes.get(name)
        if versions is None:
            validate_model_name(name)
            raise ModelNotFound(f"model '{name}' is not served")
        if version is not None:
            found = versions.get(version)
            if found is None:
                raise ModelNotFound(
                    f"model '{name}' version {version} is not READY; "
                    f"ready versions: {sorted(versions)}"
                )
            return found[0]
        if not versions:
            raise ModelNotFound(f"model '{name}' has no READY version")
        return versions[max(versions)][1]

    def knows(self, name: str) -> bool:
        return name in self._routes

    def model_names(self) -> list[str]:
        return sorted(self._routes)

    async def shutdown(self) -> None:
        """Refuse new requests; return once every request sent to the engine is answered."""
        self._stopping = True
        await self._client.drained()


class EngineClient:
    """The frontend's end of its link to the engine; the frontend's model controller too (it
    controls nothing: it connects, and follows the engine's routing)."""

    def __init__(self, layout: RunLayout, shm_threshold: int, index: int) -> None:
        self._layout = layout
        self._shared = SharedTensors(layout.shm_prefix, shm_threshold)
        self.registry = RemoteRegistry(self, Refusals(layout.refusals, index))
        self.on_health: Callable[[bool], None] = lambda serving: None
        self.on_reconnected: Callable[[], None] = lambda: None
        self._lost = False
        self._link: Link | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._stages: dict[tuple[str, int], list[float]] = {}
        self._state_received = asyncio.Event()
        self._closed = False
        self._reconnecting: asyncio.Task[None] | None = None
        self.accepting = False
        self.serving = False

    # -- controller -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to the engine (retrying while it loads its models) and take its routing."""
        await self._connect()
        await self._state_received.wait()

    async def stop(self) -> None:
        """Nothing to stop: the models are the engine's."""

    def close(self) -> None:
        self._closed = True
        self._send_stages()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._link is not None:
            self._link.send(("bye",))
            self._link.close()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                _, link = await loop.create_unix_connection(
                    lambda: Link(self._on_frame, self._on_lost), str(self._layout.engine_ipc)
                )
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(RECONNECT_INTERVAL)
                continue
            self._link = link
            link.send(("hello", os.getpid()))
            return

    def _on_lost(self, exc: Exception | None) -> None:
        self._link = None
        self._lost = True
        # Every request sent is failed below: inputs the engine did not read are nobody's.
        remove_shared(self._shared.prefix)
        self._apply_state(False, False)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Unavailable("the engine process went away; retry"))
        self._idle.set()
        if not self._closed:
            log.error("frontend pid %d: lost the engine; reconnecting", os.getpid())
            self._reconnecting = asyncio.get_running_loop().create_task(self._connect())

    # -- frames ---------------------------------------------------------------------------------

    def _on_frame(self, header: Any, body: bytes) -> None:
        kind = header[0]
        if kind == "result":
            _, rid, version, queue_time, compute_time, rows, specs = header
            future = self._pending.pop(rid, None)
            try:
                outputs = unpack_tensors(specs, body, self._layout.shm_prefix)
            except Exception as exc:
                log.exception("frontend: the answer to request %d could not be read", rid)
                if future is not None and not future.done():
                    future.set_exception(
                        InferenceFailed(f"the engine's answer could not be read: {exc}")
                    )
            else:
                if future is not None and not future.done():
                    future.set_result((version, outputs, queue_time, compute_time, rows))
        elif kind == "error":
            _, rid, name, message = header
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_exception(error_of(name, message))
        elif kind == "state":
            _, accepting, serving, routes = header
            self.registry.update(routes)
            if self._lost:
                self._lost = False
                self.on_reconnected()
            self._apply_state(accepting, serving)
            self._state_received.set()
        else:
            log.error("frontend: unknown frame %r from the engine", kind)
            return
        if not self._pending:
            self._idle.set()

    def _apply_state(self, accepting: bool, serving: bool) -> None:
        self.accepting = accepting
        if serving != self.serving:
            self.serving = serving
            self.on_health(serving)

    # -- requests -------------------------------------------------------------------------------

    async def infer(self, target: RemoteVersion, request: InferRequest) -> InferResult:
        link = self._link
        if link is None:
            raise Unavailable("the engine is not available")
        rid = next(self._ids)
        specs, body = pack_tensors(request.inputs.items(), self._shared)
        link.send(
            (
                "infer",
                rid,
                request.model,
                target.requested,
                target.generation,
                request.outputs,
                request.id,
                request.priority,
                request.deadline,
                portable_context(request.trace_context),
                specs,
            ),
            body,
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._idle.clear()
        try:
            result = await future
        except asyncio.CancelledError:
            if self._pending.pop(rid, None) is not None and self._link is link:
                link.send(("cancel", rid))
            if not self._pending:
                self._idle.set()
            raise
        return InferResult(request.model, *result)

    async def drained(self) -> None:
        await self._idle.wait()

    def served(self, key: tuple[str, int], decode: float, encode: float, handler: float) -> None:
        stages = self._stages.get(key)
        if stages is None:
            if not self._stages:
                asyncio.get_running_loop().call_later(SERVED_INTERVAL, self._send_stages)
            stages = self._stages[key] = [0, 0.0, 0.0, 0.0]
        stages[0] += 1
        stages[1] += decode
        stages[2] += encode
        stages[3] += handler

    def _send_stages(self) -> None:
        stages, self._stages = self._stages, {}
        if stages and self._link is not None:
            self._link.send(("served", {k: tuple(v) for k, v in stages.items()}))
