"""Logs: one JSON object per line through stdlib logging (python-json-logger), each carrying the
trace and span ids when written inside a traced request; and a sampled access log."""

from __future__ import annotations

import logging
import random
import sys
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
