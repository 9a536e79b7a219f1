"""How a client's channels are made: which servers (one address, several, or a DNS name), TLS,
the service config that balances calls over the servers and retries refused ones, and how many
connections each server gets.

Balancing and retries are gRPC's own (its service config, applied in its C core): nothing
here runs per call, so a call costs what it cost without them.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from inferd_client._common import channel_options

# A path to a PEM file, or the PEM itself (bytes, or text starting with -----BEGIN).
Pem = bytes | str | os.PathLike[str]

DEFAULT_RETRIES = 2
# gRPC caps a retry policy at 5 attempts.
MAX_RETRIES = 4

# Calls safe to send again after UNAVAILABLE: inference has no side effect, and a server
# answers UNAVAILABLE only for a request it did not execute (draining, see docs/operations.md)
# or when the connection failed. Streams and the control RPCs are never retried.
RETRIED_METHODS = (
    {"service": "inferd.v1.Predict", "method": "Predict"},
    {"service": "inference.GRPCInferenceService", "method": "ModelInfer"},
    {"service": "inferd.v1.ModelStatus", "method": "GetModelStatus"},
    {"service": "inferd.v1.ModelStatus", "method": "GetModelMetadata"},
    {"service": "inferd.v1.ModelStatus", "method": "ListModels"},
)

# gRPC sends a request again only while it holds a copy; its default (256 KiB) would leave
# most image batches unretried. The copy is released once the server answers.
RETRY_BUFFER_BYTES = 16 * 1024 * 1024

# gRPC keeps one connection per address for all of a process's channels whose arguments are
# equal (its global subchannel pool), so N plain channels would still be one connection. A pool
# of its own per channel, and an argument that differs per channel, give each channel its own
# connection (counted in tests/integration/test_client_connections.py).
LOCAL_SUBCHANNEL_POOL = ("grpc.use_local_subchannel_pool", 1)
CONNECTION_INDEX_OPTION = "inferd.connection"

_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds")
_BALANCED_SCHEMES = ("dns", "ipv4", "ipv6")


@dataclass(frozen=True)
class ChannelPlan:
    """What to pass to grpc's `insecure_channel` / `secure_channel`, for each of
    `connections` channels."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    connections: int = 1

    def channel_options(self) -> list[list[tuple[str, Any]]]:
        """The options of each channel: one channel per connection to each server."""
        return pooled_options(self.options, self.connections)

    def open(self, grpc_module: Any) -> tuple[Any, ...]:
        """The channels, made by `grpc_module` (`grpc` or `grpc.aio`: the same two functions)."""
        if self.credentials is None:
            return tuple(
                grpc_module.insecure_channel(self.target, options=options)
                for options in self.channel_options()
            )
        return tuple(
            grpc_module.secure_channel(self.target, self.credentials, options=options)
            for options in self.channel_options()
        )


def plan_channel(
    target: str | Sequence[str],
    *,
    max_message_bytes: int,
    options: Iterable[tuple[str, Any]] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    root_certificates: Pem | None = None,
    certificate_chain: Pem | None = None,
    private_key: Pem | None = None,
    server_name_override: str | None = None,
    retries: int | bool = DEFAULT_RETRIES,
    connections: int = 1,
) -> ChannelPlan:
    """The channels for `target`, checked: ValueError on a target, TLS or connections argument
    that cannot work (named in the message)."""
    count = connection_count(connections)
    grpc_target, balanced = channel_target(target)
    extra: list[tuple[str, Any]] = []
    config = service_config(balanced, retry_count(retries))
    if config is not None:
        extra.append(("grpc.service_config", config))
    if retry_count(retries) > 0:
        extra.append(("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES))
    if server_name_override:
        extra.append(("grpc.ssl_target_name_override", server_name_override))
    given = list(options or ())
    keys = {key for key, _ in given}
    merged = [o for o in extra if o[0] not in keys] + given
    return ChannelPlan(
        grpc_target,
        channel_credentials(
            credentials, root_certificates, certificate_chain, private_key, server_name_override
        ),
        channel_options(max_message_bytes, merged),
        count,
    )


def connection_count(connections: int) -> int:
    if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
        raise ValueError(f"connections: 1 or more, got {connections!r}")
    return connections


def pooled_options(
    options: Sequence[tuple[str, Any]], connections: int
) -> list[list[tuple[str, Any]]]:
    """The options of each of `connections` channels to one target, so that each opens its
    own connection to every server. One channel keeps `options` as they are, and shares its
    connection with the process's other channels of the same options, as gRPC does."""
    if connection_count(connections) == 1:
        return [list(options)]
    return [
        [*options, LOCAL_SUBCHANNEL_POOL, (CONNECTION_INDEX_OPTION, index)]
        for index in range(connections)
    ]


def channel_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """(gRPC target, whether calls are balanced over several servers).

    `host:port` stays as it is: one server (gRPC's pick_first). Several addresses (a list, or
    one string with commas) must be IP literals and become an `ipv4:`/`ipv6:` target; a
    `dns:///name:port` target uses every address the name resolves to (re-resolved when a
    connection drops). Both are balanced with round_robin."""
    if isinstance(target, str):
        scheme = target.split(":", 1)[0]
        if scheme in _SCHEMES:
            return target, scheme in _BALANCED_SCHEMES
        if "," not in target:
            return target, False
        target = [t for t in target.split(",") if t.strip()]
    addresses = [a.strip() for a in target]
    if not addresses:
        raise ValueError("target: no address given")
    if len(addresses) == 1:
        return channel_target(addresses[0])  # one server, whatever its spelling
    families = {_ip_family(a) for a in addresses}
    if len(families) > 1:
        raise ValueError(
            f"target {addresses}: IPv4 and IPv6 addresses cannot be mixed in one channel"
        )
    return f"{families.pop()}:{','.join(addresses)}", True


def _ip_family(address: str) -> str:
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    try:
        ip = ipaddress.ip_address(host)
        valid = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(
            f"target address {address!r}: several servers are given as IP:PORT ([IPv6]:PORT); "
            "for a host name use one 'dns:///NAME:PORT' target, which balances over every "
            "address the name resolves to"
        )
    return "ipv4" if ip.version == 4 else "ipv6"


def retry_count(retries: int | bool) -> int:
    if isinstance(retries, bool):
        retries = DEFAULT_RETRIES if retries else 0  # True: the default, not one retry
    count = int(retries)
    if not 0 <= count <= MAX_RETRIES:
        raise ValueError(f"retries: 0 (off) to {MAX_RETRIES}, got {retries!r}")
    return count


def service_config(balanced: bool, retries: int) -> str | None:
    """gRPC's service config (JSON) for these settings; None when gRPC's defaults do."""
    config: dict[str, Any] = {}
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        # Each server's grpc.health.v1 status, watched on each connection: a draining server
        # turns NOT_SERVING first, and round_robin stops picking it within a round trip
        # instead of after a refused call per client.
        config["healthCheckConfig"] = {"serviceName": ""}
    if retries > 0:
        config["methodConfig"] = [
            {
                "name": list(RETRIED_METHODS),
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config) if config else None


def channel_credentials(
    credentials: grpc.ChannelCredentials | None,
    root_certificates: Pem | None,
    certificate_chain: Pem | None,
    private_key: Pem | None,
    server_name_override: str | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials from the PEM arguments (None: plaintext). With only
    `server_name_override`, TLS verified against the system's root certificates."""
    files = (root_certificates, certificate_chain, private_key)
    if credentials is not None:
        if any(f is not None for f in files):
            raise ValueError(
                "give either credentials or root_certificates/certificate_chain/private_key"
            )
        return credentials
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (client certificate)")
    if all(f is None for f in files) and not server_name_override:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem("root_certificates", root_certificates),
        private_key=read_pem("private_key", private_key),
        certificate_chain=read_pem("certificate_chain", certificate_chain),
    )


def read_pem(name: str, pem: Pem | None) -> bytes | None:
    if pem is None or isinstance(pem, bytes):
        return pem
    if isinstance(pem, str) and pem.lstrip().startswith("-----BEGIN"):
        return pem.encode("ascii")
    try:
        return Path(pem).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {pem}: {exc.strerror or exc}") from None
