"""Assembles the server: registry, gRPC services, health, reflection, metrics; and its
lifecycle, including the SIGTERM drain."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import CollectorRegistry

from inferd.api import status
from inferd.api.control_auth import ControlAuth
from inferd.api.dataplane import DataPlane
from inferd.api.health import Health
from inferd.api.inference import Limits
from inferd.api.native import ModelStatusServicer, PredictServicer
from inferd.api.native_repository import ModelRepositoryServicer
from inferd.api.oip import GRPCInferenceServicer
from inferd.api.wire import Wire
from inferd.config import ServerConfig
from inferd.connections import ConnectionConfig, connection_options
from inferd.core.admission import ByteBudget
from inferd.core.models.control import ControlMode, ModelController
from inferd.core.models.registry import ModelRegistry, SessionFactory, onnxruntime_session
from inferd.core.models.repository import ModelRepository
from inferd.core.observer import MultiObserver, Observer
from inferd.observability.admission_metrics import AdmissionCollector
from inferd.observability.gpu import GpuCollector
from inferd.observability.logging import AccessLog, quiet_callers_gone
from inferd.observability.metrics import PrometheusObserver
from inferd.observability.tls_metrics import TlsCollector
from inferd.observability.tracing import (
    RequestTracing,
    TracingObserver,
    server_interceptor,
    tracer_provider,
)
from inferd.tls import ReloadCounts, ServerCertificates, TlsFiles
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2,
    model_repository_pb2_grpc,
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
)
from inferd_wire.proto.inference import grpc_service_pb2, grpc_service_pb2_grpc

log = logging.getLogger(__name__)

QUIET_PERIOD = 0.1
STREAM_GRACE = 1.0
# Seconds of the grace period kept for stopping the transport and the metrics endpoint.
TRANSPORT_RESERVE = 0.5

SERVICE_NAMES = (
    predict_pb2.DESCRIPTOR.services_by_name["Predict"].full_name,
    model_status_pb2.DESCRIPTOR.services_by_name["ModelStatus"].full_name,
    model_repository_pb2.DESCRIPTOR.services_by_name["ModelRepository"].full_name,
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every file the served services are defined in, with their imports, in one pool.

    Reflection answers from a single pool, but the Open Inference Protocol's messages live in
    inferd's own (`inferd_wire.pool`, beside tritonclient's `inference` package) and the rest in
    protobuf's default pool."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for module in (
        predict_pb2,
        model_status_pb2,
        model_repository_pb2,
        grpc_service_pb2,
        health_pb2,
        reflection_pb2,
    ):
        add(module.DESCRIPTOR)
    return pool


def channel_options(
    max_message_bytes: int, connections: ConnectionConfig | None = None, reuse_port: bool = False
) -> list[tuple[str, Any]]:
    """The server's gRPC options: message limits, and keepalive and connection lifetimes
    (inferd/connections.py; gRPC's defaults when `connections` is None)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A second server on a taken port must fail to start, not share its connections; only
        # the frontends of one server share theirs (`inferd serve --workers N`).
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        *(connection_options(connections) if connections is not None else ()),
    ]


class InferenceServer:
    """One process that serves everything. `inferd serve --workers N` runs its two halves in
    separate processes (`inferd/workers/`): an engine that keeps the models, and frontends that
    speak gRPC; each is this class with the hooks below overridden."""

    # The frontends of `--workers N` share the gRPC port.
    reuse_port = False

    def __init__(
        self,
        config: ServerConfig,
        observer: Observer | None = None,
        session_factory: SessionFactory = onnxruntime_session,
        span_processor: SpanProcessor | None = None,
    ) -> None:
        self.config = config
        self.metrics = PrometheusObserver(latency_buckets=config.latency_buckets)
        self.gpu_metrics = GpuCollector()
        self.metrics.registry.register(self.gpu_metrics)
        self.tracer_provider = tracer_provider(config.tracing, span_processor)
        observers: list[Observer] = [self.metrics]
        if config.access_log_sample_ratio > 0:
            observers.append(AccessLog(config.access_log_sample_ratio))
        if self.tracer_provider is not None:
            observers.append(TracingObserver(self.tracer_provider))
        if observer is not None:
            observers.append(observer)
        self.observer: Observer = MultiObserver(observers)
        self.request_tracing = RequestTracing(self.tracer_provider)
        self.registry, self.controller = self.backend(session_factory)
        token = config.control_token.get_secret_value() if config.control_token else None
        self.control_auth = ControlAuth(token)
        # Both protocols' frontends translate into this one object.
        self.budget = ByteBudget(config.max_request_bytes_in_flight)
        self.dataplane = DataPlane(
            self.registry,
            Limits(
                max_elements=config.max_elements_per_request,
                max_bytes_elements=config.max_bytes_elements_per_request,
            ),
            self.observer,
            self.request_tracing,
            self.budget,
        )
        self.health = Health()
        self.wire = Wire(self.budget, self.observer, self.route)
        self.admission_metrics = AdmissionCollector(self.budget)
        self.metrics.registry.register(self.admission_metrics)
        quiet_callers_gone(status.unanswered.inc)
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()
        self.certificates: ServerCertificates | None = None

    # -- hooks of the worker processes ---------------------------------------------------------

    def backend(self, session_factory: SessionFactory) -> tuple[Any, Any]:
        """The registry requests are routed by, and the model controller."""
        c = self.config
        registry = ModelRegistry(
            c.models, self.observer, session_factory, retired_retention_s=c.retired_retention_s
        )
        controller = ModelController(
            registry,
            ModelRepository(c.model_repository),
            ControlMode(c.model_control),
            poll_interval_s=c.poll_interval_s,
            require_ready_marker=c.require_ready_marker,
            settle_s=c.settle_s,
        )
        return registry, controller

    def route(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        """Another handler for `method` than the servicer's (a frontend forwards most)."""
        return None

    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def exposition(self) -> CollectorRegistry:
        """What /metrics serves."""
        return self.metrics.registry

    async def announce_health(self) -> None:
        """Listening: report SERVING."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def start(self) -> None:
        """Load the models, then listen. Health reports SERVING once everything listens."""
        c = self.config
        # Bad TLS files refuse the start before any model is loaded.
        tls_files = TlsFiles.from_settings(c.tls_cert, c.tls_key, c.tls_client_ca)
        self.certificates = ServerCertificates(tls_files) if tls_files is not None else None
        self.tls_metrics = TlsCollector(
            self.certificates.counts if self.certificates else ReloadCounts()
        )
        self.metrics.registry.register(self.tls_metrics)
        await self.controller.start()
        interceptors = []
        if self.tracer_provider is not None:
            interceptors.append(server_interceptor(self.tracer_provider))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=channel_options(c.max_message_bytes, c.connections, self.reuse_port),
        )
        self._add_services(server)
        address = self.address()
        if self.certificates is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self.certificates.credentials())
        await server.start()
        self._grpc = server
        if c.metrics_port >= 0:
            self._metrics_http, self.metrics_port = self.metrics.serve(
                c.metrics_host or c.host, c.metrics_port, self.exposition()
            )
        await self.announce_health()
        self.log_listening()

    def log_listening(self) -> None:
        """The line that says the server is up (tools wait for it: loadtest/server_process.py)."""
        c = self.config
        log.info(
            "inferd serving %d model(s) on %s:%d (metrics on port %s)",
            len(self.registry.model_names()),
            c.host,
            self.port,
            self.metrics_port if c.metrics_port >= 0 else "off",
            extra={"tls": self.certificates.mode if self.certificates is not None else "off"},
        )

    def reload_certificates(self) -> bool:
        """Re-read the TLS files now (SIGHUP); True when new ones were loaded. Blocking file
        reads: call it off the event loop."""
        return self.certificates.reload() if self.certificates is not None else False

    def _add_services(self, server: grpc.aio.Server) -> None:
        """Every service, registered through `Wire` (requests parsed and admitted there)."""
        c = self.config
        wire = self.wire
        wire.add(
            predict_pb2_grpc.add_PredictServicer_to_server,
            PredictServicer(self.dataplane, stream_window=c.stream_window),
            server,
        )
        wire.add(
            model_status_pb2_grpc.add_ModelStatusServicer_to_server,
            ModelStatusServicer(self.dataplane),
            server,
        )
        wire.add(
            model_repository_pb2_grpc.add_ModelRepositoryServicer_to_server,
            ModelRepositoryServicer(self.controller, self.control_auth),
            server,
        )
        wire.add(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            GRPCInferenceServicer(
                self.dataplane, self.controller, self.control_auth, stream_window=c.stream_window
            ),
            server,
        )
        wire.add(health_pb2_grpc.add_HealthServicer_to_server, self.health, server)
        names = (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        wire.add(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection_aio.ReflectionServicer(names, pool=reflection_pool()),
            server,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new requests (UNAVAILABLE), answer every accepted one,
        then close; all within `grace` seconds (the config's grace period by default), the
        transport's own stop included."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_period_s if grace is None else grace
        started = time.monotonic()
        end = started + grace
        # Draining and quiescing end this much before the grace period does, so that stopping
        # the transport and the metrics endpoint fits inside it too.
        deadline = end - min(TRANSPORT_RESERVE, grace / 4)
        await self.health.enter_graceful_shutdown()
        await self.controller.stop()
        try:
            await asyncio.wait_for(
                self.registry.shutdown(), timeout=max(deadline - time.monotonic(), 0)
            )
        except TimeoutError:
            log.error("grace period of %.1f s ran out with requests still executing", grace)
        await self._quiesce(deadline)
        closing_metrics = None
        if self._metrics_http is not None:
            # socketserver's shutdown waits up to its 0.5 s poll: overlap it with the transport.
            closing_metrics = asyncio.ensure_future(asyncio.to_thread(self._close_metrics_http))
        if self._grpc is not None:
            # Every accepted request is answered by now; what remains open is streams waiting
            # for clients (health Watch, idle PredictStream): give replies in flight a moment
            # to go out, not the whole grace period.
            since_refused = time.monotonic() - self.registry.last_refused
            await self._grpc.stop(grace=max(min(end - time.monotonic(), STREAM_GRACE), 0.0))
            if since_refused < QUIET_PERIOD:
                # Clients were still sending: calls in transit now, that reached the server but
                # no handler, are ended CANCELLED by gRPC itself (grpc/grpc#41785); say how
                # close the last refusal was, to size that window (docs/operations.md).
                log.warning(
                    "transport stopped %.0f ms after the last request refused UNAVAILABLE; "
                    "calls in transit at that instant end CANCELLED (grpc/grpc#41785)",
                    since_refused * 1e3,
                )
        if closing_metrics is not None:
            await closing_metrics
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self._stopped.set()
        log.info("inferd stopped %.2f s after the drain began", time.monotonic() - started)

    def _close_metrics_http(self) -> None:
        self._metrics_http.shutdown()
        self._metrics_http.server_close()

    async def _quiesce(self, deadline: float) -> None:
        """Keep answering UNAVAILABLE until clients stop sending (QUIET_PERIOD without one),
        or the grace period ends. Stopping the transport at once would reset calls that were
        in transit but not yet handed to a handler, and their clients would see CANCELLED
        instead of a retryable UNAVAILABLE."""
        while True:
            quiet_for = time.monotonic() - self.registry.last_refused
            left = deadline - time.monotonic()
            if quiet_for >= QUIET_PERIOD or left <= 0:
                return
            await asyncio.sleep(min(QUIET_PERIOD - quiet_for, left))


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    server = InferenceServer(config)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: loop.run_in_executor(None, server.reload_certificates)
    )
    await server.start()
    await stop_requested.wait()
    log.info("signal received: draining (grace period %.1f s)", config.grace_period_s)
    await server.stop()
