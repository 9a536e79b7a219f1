"""The gRPC channels of the network targets: plaintext, or TLS from the spec's `tls_*` keys; a
worker opens `connections` of them, each on a connection of its own (as inferd_client does).

No retries and no balancing over servers (unlike inferd_client): a refused request is a
measured failure, not something to hide behind a second attempt.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from inferd.loadtest.targets.target import TargetError, TargetSpec
from inferd_client._channel import ChannelPlan, channel_credentials


def _plan(spec: TargetSpec, options: Sequence[tuple[str, Any]], connections: int) -> ChannelPlan:
    """The target's channels: its own options (gRPC's message limits unless they say),
    credentials from its `tls_*` keys."""
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
    return ChannelPlan(spec.where, credentials, list(options), connections)


def blocking_channel(spec: TargetSpec, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """For the coordinator (metadata, counters)."""
    (channel,) = _plan(spec, options, 1).open(grpc)
    return channel


class SenderChannels:
    """A worker's `spec.connections` channels to the target, made inside its event loop."""

    def __init__(self, spec: TargetSpec, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.channels = list(_plan(spec, options, spec.connections).open(grpc.aio))

    def in_turn(self, method: str) -> Callable[[], grpc.aio.UnaryUnaryMultiCallable]:
        """`method` (bytes in, bytes out) on every channel: each call of the result gives the
        next one. One C call per request, and no lock: a worker sends from one event loop."""
        return itertools.cycle([c.unary_unary(method) for c in self.channels]).__next__

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
