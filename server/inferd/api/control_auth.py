"""Bearer-token check for control-plane RPCs: every repository RPC of both protocols
(inferd.v1.ModelRepository Index, Load, Unload; the Open Inference Protocol's RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload), answered alike. A servicer with a `control_auth`
marks each of them `@requires_control_token`."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import grpc

from inferd.core.errors import FailedPrecondition, PermissionDenied, Unauthenticated


class ControlAuth:
    """`token` None: control RPCs are off. Otherwise each call needs the gRPC metadata
    `authorization: Bearer <token>`."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, metadata: Sequence[Any] | None) -> None:
        if self._token is None:
            raise FailedPrecondition(
                "control RPCs are disabled; set control_token in the server's configuration"
            )
        header = next(
            (value for key, value in metadata or () if key.lower() == "authorization"), None
        )
        if header is None:
            raise Unauthenticated("metadata 'authorization: Bearer <token>' is missing")
        scheme, _, credential = str(header).partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated("metadata 'authorization' must be 'Bearer <token>'")
        if not hmac.compare_digest(credential.strip().encode(), self._token):
            raise PermissionDenied("the bearer token does not grant control RPCs")


class ControlServicer(Protocol):
    control_auth: ControlAuth


Method = TypeVar("Method", bound=Callable[..., Any])


def requires_control_token(method: Method) -> Method:
    """A unary servicer method that runs only when `ControlAuth.check` passes; its errors
    (FAILED_PRECONDITION, UNAUTHENTICATED, PERMISSION_DENIED) become statuses through
    `@abort_on_error`, which must wrap this decorator."""

    @functools.wraps(method)
    async def checked(
        self: ControlServicer, request: object, context: grpc.aio.ServicerContext
    ) -> object:
        self.control_auth.check(context.invocation_metadata())
        return await method(self, request, context)

    return cast(Method, checked)
