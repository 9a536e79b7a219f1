"""W3C trace context for outgoing calls, when OpenTelemetry is installed (it is optional)."""

from __future__ import annotations

from typing import Any

_propagator: Any
try:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the client works without OpenTelemetry
    _propagator = None
else:
    _propagator = TraceContextTextMapPropagator()


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """`traceparent` (and `tracestate`) metadata for the caller's active span, else None."""
    if _propagator is None:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return tuple(carrier.items()) or None
