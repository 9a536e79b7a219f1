"""How a frontend of `inferd serve --workers N` answers the RPCs it does not serve itself
(status, metadata, statistics, repository control, watches): it forwards them, unparsed, to
the engine's own gRPC server on a Unix socket, so that they are answered from the one registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc


class EngineProxy:
    """Forwards an RPC, as bytes, to the engine's gRPC socket: its metadata and deadline go
    with it, and its answer or status comes back as the engine gave it."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._channel: grpc.aio.Channel | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self._target,
                options=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1),
                    # A restarted engine is answered as soon as it listens: gRPC's default
                    # backoff (1 s, growing to 120 s) kept forwarded calls failing for
                    # seconds after the engine was back.
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 500),
                    # Its own connection, so that `reset` really starts a new one (channels
                    # with equal arguments share gRPC's global subchannel pool).
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def reset(self) -> None:
        """Open a new channel for the next calls; the old one closes in the background."""
        old, self._channel = self._channel, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def handler(self, method: str, original: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if original.unary_unary is not None:

            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                call = self.channel.unary_unary(method)
                try:
                    return await call(request, **_forwarded(context))
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                except asyncio.CancelledError:
                    code, details = _channel_closed()
                await context.abort(code, details)
                raise AssertionError("unreachable")

            return grpc.unary_unary_rpc_method_handler(unary)
        if original.unary_stream is not None:

            async def stream(
                request: bytes, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                call = self.channel.unary_stream(method)(request, **_forwarded(context))
                try:
                    async for reply in call:
                        yield reply
                    return
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                except asyncio.CancelledError:
                    code, details = _channel_closed()
                await context.abort(code, details)

            return grpc.unary_stream_rpc_method_handler(stream)
        raise NotImplementedError(f"{method}: forwarding a client stream is not supported")


def _channel_closed() -> tuple[grpc.StatusCode, str]:
    """A forwarded call cancelled under it: its caller's own cancel goes on; a call on a
    channel that `reset` closed (the engine restarted meanwhile) is answered UNAVAILABLE, not
    left without an answer until its deadline."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return grpc.StatusCode.UNAVAILABLE, "the engine restarted while the call was forwarded; retry"


_DROPPED_METADATA = ("user-agent", "grpc-", ":")


def _forwarded(context: grpc.aio.ServicerContext) -> dict[str, Any]:
    metadata = tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith(_DROPPED_METADATA)
    )
    return {"metadata": metadata, "timeout": context.time_remaining()}
