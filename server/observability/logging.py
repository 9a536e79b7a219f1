"""Log set-up: one line per event, key facts first."""

from __future__ import annotations

import logging


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # gRPC and ONNX Runtime are chatty below WARNING.
    logging.getLogger("grpc").setLevel(logging.WARNING)
