"""TLS for the gRPC port: the certificate files named by the config, checked before the server
starts, and re-read while it runs, without a restart.

gRPC asks `ServerCertificates.fetch` for a new certificate configuration before every TLS
handshake (grpc.dynamic_ssl_server_credentials), on one of its own threads. It answers from a
`stat` of the files (three syscalls, no read) unless they changed; changed files are read,
checked (the key matches the certificate, the CA bundle parses) and handed to gRPC, which uses
them for that handshake and every later one. Connections already open keep the certificate
they were opened with, so calls in flight are never dropped. SIGHUP (`reload`) re-reads the
files even when their metadata did not change; the next handshake picks them up.

New files that fail the checks are logged and counted, and the server keeps serving the
certificates it has. Replace the files by renaming new ones into place (as a Kubernetes secret
volume does): a cert written before its key is otherwise seen, briefly, as a mismatched pair
(logged as a failed reload, then loaded once the key arrives).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

log = logging.getLogger(__name__)

Trigger = Literal["file change", "SIGHUP"]


class TlsConfigError(ValueError):
    """TLS settings or files the server cannot serve with; the message says which and why."""


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's certificate chain, its key and (for mutual TLS) the CA bundle that
    client certificates must chain to are."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_settings(
        cls, cert: Path | None, key: Path | None, client_ca: Path | None
    ) -> TlsFiles | None:
        """The files of the `tls_*` settings; None when TLS is off."""
        if cert is None and key is None:
            if client_ca is not None:
                raise TlsConfigError("tls_client_ca is set but tls_cert and tls_key are not")
            return None
        if cert is None:
            raise TlsConfigError("tls_key is set but tls_cert is not: give both (PEM files)")
        if key is None:
            raise TlsConfigError("tls_cert is set but tls_key is not: give both (PEM files)")
        return cls(cert, key, client_ca)

    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.cert, self.key, self.client_ca) if p is not None)


@dataclass(frozen=True)
class Certificates:
    """The files' contents, checked."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate (DER), as `openssl x509 -fingerprint -sha256`."""
        begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
        pem = self.cert_chain.decode("ascii", errors="replace")
        start = pem.find(begin)
        stop = pem.find(end, start)
        if start < 0 or stop < 0:
            return ""
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem[start : stop + len(end)])).hexdigest()

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting} {path}: cannot read it: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key.
    raise TlsConfigError("encrypted private keys are not supported")


def read_certificates(files: TlsFiles) -> Certificates:
    """Read and check the files; TlsConfigError says which one is wrong and how."""
    certs = Certificates(
        _read("tls_cert", files.cert),
        _read("tls_key", files.key),
        _read("tls_client_ca", files.client_ca) if files.client_ca is not None else None,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"tls_key {files.key} does not match the certificate in tls_cert {files.cert}"
            ) from None
        raise TlsConfigError(
            f"tls_cert {files.cert} / tls_key {files.key}: not a PEM certificate chain and "
            f"its unencrypted private key ({exc.reason or exc})"
        ) from None
    except (OSError, TlsConfigError) as exc:
        raise TlsConfigError(f"tls_cert {files.cert} / tls_key {files.key}: {exc}") from None
    if certs.client_ca is not None:
        try:
            context.load_verify_locations(cadata=certs.client_ca.decode("utf-8", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TlsConfigError(
                f"tls_client_ca {files.client_ca}: not a PEM CA bundle ({exc})"
            ) from None
    # The check above read the files by path; what it checked must be what we hand to gRPC.
    again = (_read("tls_cert", files.cert), _read("tls_key", files.key))
    if again != (certs.cert_chain, certs.private_key):
        raise TlsConfigError(f"tls_cert {files.cert} / tls_key {files.key} changed while read")
    return certs


@dataclass
class ReloadCounts:
    """Reloads since start, for /metrics (observability/tls_metrics.py)."""

    ok: int = 0
    error: int = 0


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int, int], ...]:
    """What a changed file changes: inode (a rename into place), size and times."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0, 0))
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class ServerCertificates:
    """The certificates the gRPC port serves with, kept in step with the files."""

    def __init__(self, files: TlsFiles, counts: ReloadCounts | None = None) -> None:
        self.files = files
        self.counts = counts or ReloadCounts()
        self._lock = threading.Lock()
        self._seen = _signature(files.paths())
        self.current = read_certificates(files)
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @property
    def mode(self) -> str:
        """Whether clients must present a certificate ("mutual") or not ("server")."""
        return "server" if self.files.client_ca is None else "mutual"

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(),
            self.fetch,
            require_client_authentication=self.files.client_ca is not None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's hook, before each handshake: new configuration, or None to keep the one it has."""
        with self._lock:
            seen = _signature(self.files.paths())
            if seen != self._seen:
                self._seen = seen
                self._load("file change")
            pending, self._pending = self._pending, None
            return pending

    def reload(self) -> bool:
        """Re-read the files now (SIGHUP); True when new certificates were loaded. New
        connections get them from their handshake on."""
        with self._lock:
            self._seen = _signature(self.files.paths())
            return self._load("SIGHUP")

    def _load(self, trigger: Trigger) -> bool:
        try:
            certs = read_certificates(self.files)
        except TlsConfigError as exc:
            self.counts.error += 1
            log.error(
                "TLS certificate reload failed; still serving the previous certificate",
                extra={
                    "trigger": trigger,
                    "error": str(exc),
                    "fingerprint": self.current.fingerprint,
                },
            )
            return False
        if certs == self.current:
            if trigger == "SIGHUP":
                log.info("TLS certificates unchanged", extra={"fingerprint": certs.fingerprint})
            return False
        self.current = certs
        self._pending = certs.configuration()
        self.counts.ok += 1
        log.info(
            "TLS certificates reloaded; new connections use them",
            extra={
                "trigger": trigger,
                "tls_cert": str(self.files.cert),
                "fingerprint": certs.fingerprint,
                "client_ca": str(self.files.client_ca) if self.files.client_ca else None,
            },
        )
        return True
