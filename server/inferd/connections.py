"""How long the server keeps client connections, and what keepalive pings it accepts: the
`[connections]` settings and the gRPC channel arguments they become.

gRPC ends a connection with a GOAWAY frame; a gRPC client then opens a new one for its next
call. That costs the client a TCP (and TLS) handshake: a new InferClient's first call took
1.8 ms plaintext and 3.5 ms with TLS (ECDSA P-256) against 0.65 ms for a warm call, on the
2-core dev box over loopback. What each knob costs and buys is said next to it; docs/tls.md
has what a client sees.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Seconds = Annotated[float, Field(gt=0)]


class ConnectionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keepalive_time_s: Seconds = 7200.0
    """The server pings a connection that has sent nothing for this long, to find peers that
    vanished without closing (a crashed node, a dropped NAT entry) and free their streams.
    gRPC's own default; lower it when idle streams (status watches) must be reaped sooner."""

    keepalive_timeout_s: Seconds = 20.0
    """How long a server ping waits for its answer before the connection is closed."""

    min_client_ping_interval_s: Annotated[float, Field(ge=0)] = 10.0
    """The shortest interval between a client's keepalive pings the server tolerates while it
    has sent the client nothing. Faster pings are strikes; past `max_ping_strikes` the server
    answers GOAWAY `too_many_pings` and closes the connection (calls on it fail UNAVAILABLE).
    gRPC's default is 5 min, which refuses clients configured with the commonly advised 30 s
    keepalive; 10 s still stops a client pinging in a loop."""

    max_ping_strikes: Annotated[int, Field(ge=0)] = 2
    """Pings faster than `min_client_ping_interval_s` tolerated before GOAWAY (0: unlimited)."""

    permit_keepalive_without_calls: bool = True
    """Accept client keepalive pings on a connection with no call in flight. Clients that keep
    idle connections warm need it; such a connection is still closed after
    `max_connection_idle_s`, which counts calls, not pings."""

    max_pings_without_data: Annotated[int, Field(ge=0)] = 0
    """How many of its own keepalive pings the server sends while it sends no data (0: no
    limit, so a connection holding only an idle stream stays checked)."""

    max_connection_idle_s: Seconds | None = 300.0
    """Close a connection with no call in flight for this long (None: never). Frees what
    departed clients left open; a client that comes back reconnects on its next call. A status
    or health watch is a call, so a watching client is never idle."""

    max_connection_age_s: Seconds | None = None
    """Close every connection after this long, ±10 % (None: never). Makes clients reconnect
    and re-resolve, so load spreads onto replicas added since they connected (behind a
    Kubernetes Service, through an L4 balancer); costs one reconnect per client per period."""

    max_connection_age_grace_s: Seconds | None = None
    """After `max_connection_age_s`, how long calls already in flight may run before the
    connection is cut (None: as long as they need; a status watch would then hold it open)."""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def connection_options(config: ConnectionConfig) -> list[tuple[str, Any]]:
    """The gRPC server channel arguments for `config`; an unset limit is left out (gRPC's
    default for those is "never")."""
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            round(config.min_client_ping_interval_s * 1000),
        ),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(config.permit_keepalive_without_calls)),
        ("grpc.http2.max_pings_without_data", config.max_pings_without_data),
    ]
    for key, value in (
        ("grpc.max_connection_idle_ms", config.max_connection_idle_s),
        ("grpc.max_connection_age_ms", config.max_connection_age_s),
        ("grpc.max_connection_age_grace_ms", config.max_connection_age_grace_s),
    ):
        if value is not None:
            options.append((key, _ms(value)))
    return options
