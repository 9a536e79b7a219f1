"""Bearer-token check for control-plane RPCs (both protocols' repository services)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

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
