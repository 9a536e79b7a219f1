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
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry.sdk.trace import SpanProcessor

from inferd.api.control_auth import ControlAuth
from inferd.api.dataplane import DataPlane
from inferd.api.inference import Limits
from inferd.api.native import ModelStatusServicer, PredictServicer
from inferd.api.native_repository import ModelRepositoryServicer
from inferd.api.oip import GRPCInferenceServicer
from inferd.config import ServerConfig
from inferd.core.models.control import ControlMode, ModelController
from inferd.core.models.registry import ModelRegistry, SessionFactory, onnxruntime_session
from inferd.core.models.repository import ModelRepository
from inferd.core.observer import MultiObserver, Observer
from inferd.observability.gpu import GpuCollector
from inferd.observability.logging import AccessLog
from inferd.observability.metrics import PrometheusObserver
from inferd.observability.tracing import (
    RequestTracing,
    TracingObserver,
    server_interceptor,
    tracer_provider,
)
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


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A second server on a taken port must fail to start, not share its connections.
        ("grpc.so_reuseport", 0),
    ]


class InferenceServer:
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
        self.registry = ModelRegistry(
            config.models,
            self.observer,
            session_factory,
        )
        self.controller = ModelController(
            self.registry,
            ModelRepository(config.model_repository),
            ControlMode(config.model_control),
            poll_interval_s=config.poll_interval_s,
            require_ready_marker=config.require_ready_marker,
            settle_s=config.settle_s,
        )
        token = config.control_token.get_secret_value() if config.control_token else None
        self.control_auth = ControlAuth(token)
        # Both protocols' frontends translate into this one object.
        self.dataplane = DataPlane(
            self.registry,
            Limits(max_elements=config.max_elements_per_request),
            self.observer,
            self.request_tracing,
        )
        self.health = HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """Load the models, then listen. Health reports SERVING once everything listens."""
        c = self.config
        await self.controller.start()
        interceptors = []
        if self.tracer_provider is not None:
            interceptors.append(server_interceptor(self.tracer_provider))
        server = grpc.aio.server(
            interceptors=interceptors, options=channel_options(c.max_message_bytes)
        )
        predict_pb2_grpc.add_PredictServicer_to_server(
            PredictServicer(self.dataplane, stream_window=c.stream_window), server
        )
        model_status_pb2_grpc.add_ModelStatusServicer_to_server(
            ModelStatusServicer(self.dataplane), server
        )
        model_repository_pb2_grpc.add_ModelRepositoryServicer_to_server(
            ModelRepositoryServicer(self.controller, self.control_auth), server
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            GRPCInferenceServicer(
                self.dataplane, self.controller, self.control_auth, stream_window=c.stream_window
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
            pool=reflection_pool(),
        )
        self.port = server.add_insecure_port(f"{c.host}:{c.port}")
        await server.start()
        self._grpc = server
        if c.metrics_port >= 0:
            self._metrics_http, self.metrics_port = self.metrics.serve(c.host, c.metrics_port)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "inferd serving %d model(s) on %s:%d (metrics on port %s)",
            len(self.registry.model_names()),
            c.host,
            self.port,
            self.metrics_port if c.metrics_port >= 0 else "off",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new requests (UNAVAILABLE), answer every accepted one,
        then close; all within `grace` seconds (the config's grace period by default)."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_period_s if grace is None else grace
        deadline = time.monotonic() + grace
        await self.health.enter_graceful_shutdown()
        await self.controller.stop()
        try:
            await asyncio.wait_for(self.registry.shutdown(), timeout=grace)
        except TimeoutError:
            log.error("grace period of %.1f s ran out with requests still executing", grace)
        await self._quiesce(deadline)
        if self._grpc is not None:
            # Every accepted request is answered by now; what remains open is streams waiting
            # for clients (health Watch, idle PredictStream): give replies in flight a moment
            # to go out, not the whole grace period.
            await self._grpc.stop(grace=min(max(deadline - time.monotonic(), 0.1), STREAM_GRACE))
        if self._metrics_http is not None:
            await asyncio.to_thread(self._close_metrics_http)
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        self._stopped.set()
        log.info("inferd stopped")

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
    await server.start()
    await stop_requested.wait()
    log.info("signal received: draining (grace period %.1f s)", config.grace_period_s)
    await server.stop()
