"""The gRPC channels of the network targets: plaintext, or TLS from the spec's `tls_*` keys.

No retries and no balancing (unlike inferd_client): a refused request is a measured failure,
not something to hide behind a second attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

from inferd.loadtest.targets.target import TargetError, TargetSpec
from inferd_client._channel import channel_credentials


def _tls(spec: TargetSpec, options: Sequence[tuple[str, Any]]) -> tuple[Any, list[Any]]:
    try:
        credentials = channel_credentials(
            None,
            spec.tls_ca or None,
            spec.tls_cert or None,
            spec.tls_key or None,
            spec.tls_server_name or None,
        )
    except ValueError as exc:
        raise TargetError(f"target {spec.name}: {exc}") from None
    if spec.tls_server_name:
        options = [*options, ("grpc.ssl_target_name_override", spec.tls_server_name)]
    return credentials, list(options)


def blocking_channel(spec: TargetSpec, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """For the coordinator (metadata, counters)."""
    if not spec.tls:
        return grpc.insecure_channel(spec.where, options=list(options))
    credentials, opts = _tls(spec, options)
    return grpc.secure_channel(spec.where, credentials, options=opts)


def aio_channel(spec: TargetSpec, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """For a worker's senders, inside its event loop."""
    if not spec.tls:
        return grpc.aio.insecure_channel(spec.where, options=list(options))
    credentials, opts = _tls(spec, options)
    return grpc.aio.secure_channel(spec.where, credentials, options=opts)
