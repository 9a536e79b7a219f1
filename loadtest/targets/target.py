"""What the harness drives: a target's address and protocol, and the two faces every protocol
implements — the coordinator's (metadata, server counters) and a worker's (send one request).

A target is written `KIND:WHERE[,key=value...]`:

    native:127.0.0.1:8001                 inferd's own API (inferd.v1.Predict)
    oip:127.0.0.1:8001                    any Open Inference Protocol (KServe v2) gRPC server
    inprocess:models                      ONNX Runtime in the worker itself (a repository
    inprocess:models/mlp/1/model.onnx     directory with --model, or a model file)

Keys: `model`, `version`, `label` (the name in reports), `client_batch` (rows per request for
this target only), `threads` (in-process: sessions runs at once; default 1, like one
execution slot), `pid` (the server's process id: its CPU time, descendants included, is read
at the window boundaries and reported per request). Network targets must be loopback
addresses: this harness never loads a machine it does not run on. A TLS server takes
`tls_ca` (PEM file of the CA that signed its certificate; any `tls_*` key turns TLS on),
`tls_cert` and `tls_key` (a client certificate, for mutual TLS) and `tls_server_name` (the
name its certificate is checked against, e.g. `localhost` when it names no IP address):

    native:127.0.0.1:8001,model=mlp,tls_ca=ca.pem,tls_server_name=inferd.internal

`connections` (network targets; default 1): HTTP/2 connections each worker opens to the
server, its requests taking them in turn. A server whose frontend runs as several processes on
one port (SO_REUSEPORT) is balanced by the kernel per connection, so each process of the
harness loads at most as many of them as it has connections:

    native:127.0.0.1:8001,model=mlp,connections=4
"""

from __future__ import annotations

import abc
import ipaddress
import socket
from dataclasses import dataclass
from typing import Literal

from inferd.loadtest.inputs import ModelSignature
from inferd.loadtest.server_stats import ServerCounters

TargetKind = Literal["native", "oip", "inprocess"]
KINDS: tuple[TargetKind, ...] = ("native", "oip", "inprocess")


class TargetError(ValueError):
    """A target that cannot be driven: bad spec, non-loopback host, protocol absent."""


class RequestFailed(Exception):
    """One request failed; `code` is the gRPC status code name (or the exception type)."""

    def __init__(self, code: str, details: str = "") -> None:
        super().__init__(f"{code}: {details}" if details else code)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class TargetSpec:
    kind: TargetKind
    where: str
    model: str = ""
    version: str = ""
    label: str = ""
    client_batch: int | None = None
    threads: int = 1
    # The server process whose CPU time is measured (see loadtest/process_cpu.py).
    pid: int | None = None
    # TLS (network targets): PEM file paths, and the name to verify the certificate for.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    # HTTP/2 connections per worker process (network targets).
    connections: int = 1

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert or self.tls_key or self.tls_server_name)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "inprocess":
            return f"inprocess/{self.model}"
        return f"{self.kind}/{self.model}"


OPTION_KEYS = (
    "model",
    "version",
    "label",
    "client_batch",
    "threads",
    "pid",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_server_name",
    "connections",
)


def parse_target(text: str, default_model: str = "", default_connections: int = 1) -> TargetSpec:
    """`KIND:WHERE[,key=value...]` -> TargetSpec (see the module docstring); `default_model`
    and `default_connections` (network targets) apply where the text sets no key of its own."""
    head, *options = text.split(",")
    kind, sep, where = head.partition(":")
    if not sep or kind not in KINDS or not where:
        raise TargetError(f"target {text!r}: expected KIND:WHERE with KIND one of {KINDS}")
    fields: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or key not in OPTION_KEYS:
            raise TargetError(
                f"target {text!r}: option {option!r} is not one of "
                + ", ".join(f"{k}=" for k in OPTION_KEYS)
            )
        fields[key] = value
    if kind == "inprocess" and "connections" in fields:
        raise TargetError(f"target {text!r}: connections is for network targets")
    try:
        spec = TargetSpec(
            kind=kind,
            where=where,
            model=fields.get("model", default_model),
            version=fields.get("version", ""),
            label=fields.get("label", ""),
            client_batch=int(fields["client_batch"]) if "client_batch" in fields else None,
            threads=int(fields.get("threads", "1")),
            pid=int(fields["pid"]) if "pid" in fields else None,
            tls_ca=fields.get("tls_ca", ""),
            tls_cert=fields.get("tls_cert", ""),
            tls_key=fields.get("tls_key", ""),
            tls_server_name=fields.get("tls_server_name", ""),
            connections=(
                1 if kind == "inprocess" else int(fields.get("connections", default_connections))
            ),
        )
    except ValueError as exc:
        raise TargetError(f"target {text!r}: {exc}") from None
    if spec.tls and spec.kind == "inprocess":
        raise TargetError(f"target {text!r}: tls_* options are for network targets")
    if spec.connections < 1:
        raise TargetError(f"target {text!r}: connections must be 1 or more")
    if bool(spec.tls_cert) != bool(spec.tls_key):
        raise TargetError(f"target {text!r}: tls_cert and tls_key go together")
    if spec.kind != "inprocess":
        require_loopback(spec.where)
    if not spec.model and spec.kind != "inprocess":
        raise TargetError(f"target {text!r}: no model (give --model or ,model=NAME)")
    return spec


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise TargetError(f"address {address!r}: expected HOST:PORT") from None
    if not host or not 0 < port < 65536:
        raise TargetError(f"address {address!r}: expected HOST:PORT")
    return host, port


def require_loopback(address: str) -> None:
    """Refuse any address that is not (or does not resolve only to) the loopback interface."""
    host, port = split_address(address)
    try:
        resolved = {
            str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        }
    except socket.gaierror as exc:
        raise TargetError(f"address {address!r}: cannot resolve {host!r}: {exc}") from None
    outside = sorted(a for a in resolved if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if outside or not resolved:
        raise TargetError(
            f"address {address!r} resolves to {outside or 'nothing'}: the load generator only "
            "targets loopback addresses (127.0.0.0/8, ::1)"
        )


class TargetDriver(abc.ABC):
    """The coordinator's view of a target: what the model takes, what the server counted."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec

    @abc.abstractmethod
    def signature(self) -> ModelSignature: ...

    def counters(self) -> ServerCounters | None:
        """The server's cumulative counters for the model; None where it keeps none."""
        return None

    def describe(self) -> dict[str, str]:
        """Facts for the report (server name/version, execution providers, ...)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class RequestSender(abc.ABC):
    """A worker's connection to a target; `send` raises RequestFailed on any failure."""

    @abc.abstractmethod
    async def send(self, payload_index: int) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
