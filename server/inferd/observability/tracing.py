"""OpenTelemetry traces.

- A server span per RPC, from opentelemetry-instrumentation-grpc's aio server interceptor: a
  child of the client's context when a W3C `traceparent` arrives in the metadata.
- Per request, a `queue` child span (arrival to the start of its batch) and an `encode` child
  span (outputs to wire bytes).
- Per executed batch, one `batch` span linked to every request span it served, with the model,
  version, rows and requests as attributes. A batch span needs a parent for sampling to follow
  the requests: it is the child of its first sampled request, and exists only if one was sampled.

Sampling is parent-based with a ratio for root spans, so a trace a client propagates (sampled)
is always recorded. With the exporter `none` (the default) nothing here runs on the hot path.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Literal

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from pydantic import BaseModel, ConfigDict, Field

from inferd.core.observer import BatchReport, Observer

Exporter = Literal["none", "console", "otlp_grpc", "otlp_http"]


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exporter: Exporter = "none"
    """Where spans go: none (tracing off), console (stdout), otlp_grpc or otlp_http."""

    endpoint: str | None = None
    """OTLP endpoint, e.g. http://127.0.0.1:4317 (gRPC) or http://127.0.0.1:4318/v1/traces."""

    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of traces started here (no client context) that are recorded."""

    service_name: str = "inferd"


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    if config.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as OTLPHttpSpanExporter,
    )

    return OTLPHttpSpanExporter(endpoint=config.endpoint)


def tracer_provider(
    config: TracingConfig, processor: SpanProcessor | None = None
) -> TracerProvider | None:
    """The provider for this server, or None when tracing is off. `processor` replaces the
    configured exporter (tests pass an in-memory one)."""
    if config.exporter == "none" and processor is None:
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
    )
    provider.add_span_processor(processor or BatchSpanProcessor(_exporter(config)))
    return provider


def server_interceptor(provider: TracerProvider) -> Any:
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor(tracer_provider=provider)


def current_span() -> Span | None:
    span = trace.get_current_span()
    return span if span.get_span_context().is_valid else None


_NO_SPAN = contextlib.nullcontext()


class RequestTracing:
    """What a frontend records inside a request's span."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self._tracer = provider.get_tracer("inferd") if provider else None

    def context(self) -> Span | None:
        """The request's server span, handed to the core as its opaque trace context."""
        return current_span() if self._tracer is not None else None

    def encode_span(self) -> contextlib.AbstractContextManager[object]:
        """A child span around encoding the reply; with tracing off or the request unsampled,
        a shared no-op (this runs on every request)."""
        if self._tracer is None or current_span() is None:
            return _NO_SPAN
        return self._tracer.start_as_current_span("encode")

    def annotate(self, model: str, version: int | None, request_id: str) -> None:
        if self._tracer is None:
            return
        span = current_span()
        if span is None or not span.is_recording():
            return
        span.set_attribute("inferd.model", model)
        if version is not None:
            span.set_attribute("inferd.version", version)
        if request_id:
            span.set_attribute("inferd.request_id", request_id)


class TracingObserver(Observer):
    """Records the queue spans of each request and the span of each batch."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("inferd")

    def batch_finished(self, report: BatchReport) -> None:
        spans = [ctx if isinstance(ctx, Span) else None for ctx in report.trace_contexts]
        sampled = [s for s in spans if s is not None and s.get_span_context().trace_flags.sampled]
        if not sampled:
            return
        end = time.time_ns()
        start = end - int(report.compute_time * 1e9)
        for span, wait in zip(spans, report.queue_times, strict=True):
            if span is None:
                continue
            queue = self._tracer.start_span(
                "queue",
                context=trace.set_span_in_context(span),
                start_time=start - int(wait * 1e9),
                attributes={"inferd.queue_seconds": wait},
            )
            queue.end(end_time=start)
        batch = self._tracer.start_span(
            "batch",
            context=trace.set_span_in_context(sampled[0]),
            kind=SpanKind.INTERNAL,
            start_time=start,
            links=[Link(s.get_span_context()) for s in spans if s is not None],
            attributes={
                "inferd.model": report.model,
                "inferd.version": report.version,
                "inferd.rows": report.rows,
                "inferd.requests": report.requests,
                "inferd.compute_input_seconds": report.input_time,
                "inferd.compute_infer_seconds": report.infer_time,
                "inferd.compute_output_seconds": report.output_time,
            },
        )
        if report.error is not None:
            batch.record_exception(report.error)
            batch.set_status(Status(StatusCode.ERROR, str(report.error)))
        batch.end(end_time=end)


def portable_context(context: object) -> tuple[int, int, int] | None:
    """A request's trace context as plain values that can cross to the engine process: the
    (trace id, span id, flags) of a sampled span; None otherwise."""
    if not isinstance(context, Span):
        return None
    span_context = context.get_span_context()
    if not span_context.trace_flags.sampled:
        return None
    return span_context.trace_id, span_context.span_id, int(span_context.trace_flags)


def remote_context(value: tuple[int, int, int] | None) -> Span | None:
    """The engine's stand-in for a frontend's request span (`portable_context`): the batch's
    spans are its children and link to it, as in one process."""
    if value is None:
        return None
    trace_id, span_id, flags = value
    return trace.NonRecordingSpan(
        trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))
    )
