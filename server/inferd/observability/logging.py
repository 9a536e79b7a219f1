"""Logs: one JSON object per line through stdlib logging (python-json-logger), each carrying the
trace and span ids when written inside a traced request; and a sampled access log."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable
from typing import Literal

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from inferd.core.observer import Observer

LogFormat = Literal["json", "text"]
ACCESS_LOGGER = "inferd.access"


class TraceIdFilter(logging.Filter):
    """Adds `trace_id` and `span_id` (hex) from the current span, when there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def configure_logging(level: str, log_format: LogFormat = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceIdFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # gRPC is chatty below WARNING.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    # Python-level warnings (onnxruntime's Python layer warns this way, e.g. about providers)
    # would otherwise print raw on stderr between the JSON lines: log them on "py.warnings".
    logging.captureWarnings(True)


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"


class CallerGoneFilter(logging.Filter):
    """Drops gRPC's ERROR record for a reply it could not send because the caller had gone (a
    stream cancelled while its answers waited, say), and counts it with `on_drop` instead: it
    is the client's doing, it needs no action, and a client could otherwise flood the log with
    tracebacks by cancelling."""

    MESSAGE = "ExecuteBatchError raised in core by servicer method"

    def __init__(self, on_drop: Callable[[], None]) -> None:
        super().__init__()
        self._on_drop = on_drop

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE):
            self._on_drop()
            return False
        return True


def quiet_callers_gone(on_drop: Callable[[], None]) -> None:
    """Install `CallerGoneFilter` on gRPC's core logger (once per process)."""
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    if not any(isinstance(f, CallerGoneFilter) for f in logger.filters):
        logger.addFilter(CallerGoneFilter(on_drop))


class AccessLog(Observer):
    """One log line per answered request, for a sampled fraction of them (0 turns it off)."""

    def __init__(self, sample_ratio: float, rng: random.Random | None = None) -> None:
        self._ratio = sample_ratio
        self._rng = rng or random.Random()
        self._log = logging.getLogger(ACCESS_LOGGER)

    def request_finished(
        self, protocol: str, model: str, version: int | None, code: str, duration: float
    ) -> None:
        if self._ratio <= 0 or self._rng.random() >= self._ratio:
            return
        self._log.info(
            "request",
            extra={
                "protocol": protocol,
                "model": model,
                "version": version,
                "code": code,
                "duration_ms": round(duration * 1e3, 3),
            },
        )
