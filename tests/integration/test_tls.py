"""TLS and mutual TLS on the gRPC port: round trips with inferd's clients, tritonclient, the CLI
and the load harness; refused clients; certificate rotation without a restart (file change and
SIGHUP); and a start refused on bad files.

Certificates are made here with trustme. Servers run in the test process (`ServerThread`),
except where the process itself is under test (SIGHUP, refusal to start).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import trustme
from inprocess_server import ServerThread
from integration_support import SERVER_DEFAULTS, ServerProcess, server_env

from inferd_client import (
    AsyncInferClient,
    InferClient,
    InferError,
    StreamRequest,
    UnauthenticatedError,
    UnavailableError,
)

T = TypeVar("T")
TIMEOUT = 60.0
TOKEN = "tls-test-token"
# Every server certificate here names the loopback address and this name.
SERVER_NAME = "inferd.test"
RELOADS = "inferd_tls_certificate_reloads_total"


# --- certificates -----------------------------------------------------------------------------


def write_atomically(path: Path, data: bytes) -> None:
    """As a secret volume or cert-manager does: the new file renamed into place."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_bytes(data)
    os.replace(staged, path)


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path) -> tuple[Path, Path]:
    write_atomically(key, leaf.private_key_pem.bytes())
    write_atomically(cert, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    return cert, key


def server_leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("127.0.0.1", SERVER_NAME)


@dataclass
class Pki:
    """A server CA and certificate; a client CA, a client certificate of it and an expired
    one; and a client certificate of an unrelated CA."""

    root: Path
    server_ca: trustme.CA
    server_cert: Path
    server_key: Path
    client_ca: trustme.CA
    client_ca_file: Path
    client: trustme.LeafCert
    expired_client: trustme.LeafCert
    stranger: trustme.LeafCert

    @property
    def server_ca_pem(self) -> bytes:
        return self.server_ca.cert_pem.bytes()

    def client_args(self, leaf: trustme.LeafCert) -> dict[str, bytes]:
        return {
            "root_certificates": self.server_ca_pem,
            "certificate_chain": b"".join(p.bytes() for p in leaf.cert_chain_pems),
            "private_key": leaf.private_key_pem.bytes(),
        }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = write_leaf(server_leaf(server_ca), root / "server.pem", root / "server.key")
    client_ca.cert_pem.write_to_path(str(root / "client-ca.pem"))
    server_ca.cert_pem.write_to_path(str(root / "server-ca.pem"))
    now = datetime.now(UTC)
    return Pki(
        root=root,
        server_ca=server_ca,
        server_cert=cert,
        server_key=key,
        client_ca=client_ca,
        client_ca_file=root / "client-ca.pem",
        client=client_ca.issue_cert("client.test"),
        expired_client=client_ca.issue_cert(
            "client.test", not_before=now - timedelta(days=2), not_after=now - timedelta(days=1)
        ),
        stranger=trustme.CA().issue_cert("client.test"),
    )


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inferd.demo_models import MLP_CONFIG, build_mlp, write_model

    repository = tmp_path_factory.mktemp("mlp")
    write_model(build_mlp(), repository, "mlp", config_toml=MLP_CONFIG)
    return repository


@pytest.fixture(scope="module")
def tls_server(pki: Pki, mlp_repository: Path) -> Iterator[ServerThread]:
    """TLS (no client certificates), control RPCs on."""
    with ServerThread(
        mlp_repository,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        control_token=TOKEN,
        model_control="explicit",
    ) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, mlp_repository: Path) -> Iterator[ServerThread]:
    with ServerThread(
        mlp_repository,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.client_ca_file,
    ) as server:
        yield server


def mlp_input(rows: int = 2) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)}


def reloads(server: ServerThread, result: str) -> float | None:
    assert server.server is not None
    return server.server.metrics.registry.get_sample_value(RELOADS, {"result": result})


# --- round trips ------------------------------------------------------------------------------


def test_predict_over_tls_with_the_blocking_client(tls_server: ServerThread, pki: Pki) -> None:
    with InferClient(tls_server.target, root_certificates=pki.server_ca_pem) as client:
        out = client.infer("mlp", mlp_input(3))
        assert client.health() == "SERVING"
    assert out["probabilities"].shape == (3, 10)


async def test_predict_over_tls_with_the_asyncio_client(tls_server: ServerThread, pki: Pki) -> None:
    ca_file = str(pki.root / "server-ca.pem")  # a path works as well as the PEM itself
    async with AsyncInferClient(tls_server.target, root_certificates=ca_file) as client:
        outs = await asyncio.gather(*(client.infer("mlp", mlp_input(r)) for r in (1, 2, 3)))
    assert [o["probabilities"].shape for o in outs] == [(1, 10), (2, 10), (3, 10)]


def test_the_certificate_is_checked_against_server_name_override(
    tls_server: ServerThread, pki: Pki
) -> None:
    ca = pki.server_ca_pem
    with InferClient(
        tls_server.target, root_certificates=ca, server_name_override=SERVER_NAME
    ) as client:
        assert client.health(timeout=10) == "SERVING"
    with (
        InferClient(
            tls_server.target, root_certificates=ca, server_name_override="other.test", retries=0
        ) as client,
        pytest.raises(UnavailableError),
    ):
        client.health(timeout=10)


def test_a_plaintext_client_on_the_tls_port_fails_fast_with_unavailable(
    tls_server: ServerThread,
) -> None:
    started = time.monotonic()
    with InferClient(tls_server.target) as client, pytest.raises(UnavailableError):
        client.infer("mlp", mlp_input(), timeout=30)
    assert time.monotonic() - started < 5.0


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server: ServerThread) -> None:
    other_ca = trustme.CA().cert_pem.bytes()
    with (
        InferClient(tls_server.target, root_certificates=other_ca, retries=0) as client,
        pytest.raises(UnavailableError),
    ):
        client.infer("mlp", mlp_input(), timeout=30)


def test_control_token_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    ca = pki.server_ca_pem
    with InferClient(tls_server.target, root_certificates=ca, control_token=TOKEN) as client:
        index = client.repository_index(timeout=10)
    assert [(e.model, e.state) for e in index] == [("mlp", "READY")]
    with (
        InferClient(tls_server.target, root_certificates=ca) as client,
        pytest.raises(UnauthenticatedError),
    ):
        client.repository_index(timeout=10)


def triton_infer_over_tls(url: str, ca_file: str) -> tuple[bool, list[int]]:
    """Runs in a process of its own (see test_oip_tritonclient.py for why)."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url, ssl=True, root_certificates=ca_file)
    live = bool(client.is_server_live())
    x = np.zeros((2, 64), np.float32)
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor])
    client.close()
    return live, list(result.as_numpy("probabilities").shape)


def in_spawned_process(function: Callable[..., T], *args: Any) -> T:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result(timeout=TIMEOUT)


def test_tritonclient_with_ssl(tls_server: ServerThread, pki: Pki) -> None:
    pytest.importorskip("tritonclient.grpc", reason="tritonclient comes with the dev extra")
    live, shape = in_spawned_process(
        triton_infer_over_tls, tls_server.target, str(pki.root / "server-ca.pem")
    )
    assert live and shape == [2, 10]


def test_cli_health_and_predict_with_tls_flags(tls_server: ServerThread, pki: Pki) -> None:
    tls = ["--tls-ca", str(pki.root / "server-ca.pem"), "--tls-server-name", SERVER_NAME]
    for command in (["health"], ["predict", "mlp"]):
        result = subprocess.run(
            [sys.executable, "-m", "inferd.cli", *command, "--url", tls_server.target, *tls],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=server_env(),
        )
        assert result.returncode == 0, result.stderr
    assert "probabilities float32 [1, 10]" in result.stdout


async def test_load_harness_targets_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    from inferd.loadtest.targets import open_driver, open_sender
    from inferd.loadtest.targets.target import parse_target

    ca = pki.root / "server-ca.pem"
    spec = parse_target(f"native:{tls_server.target},model=mlp,tls_ca={ca}")
    driver = open_driver(spec)
    try:
        assert driver.signature().inputs[0].name == "input"
    finally:
        driver.close()
    sender = open_sender(spec, [mlp_input(1)], timeout_s=10)
    try:
        await sender.send(0)
    finally:
        await sender.close()


# --- mutual TLS -------------------------------------------------------------------------------


def test_mutual_tls_serves_a_client_certificate_of_the_client_ca(
    mtls_server: ServerThread, pki: Pki
) -> None:
    with InferClient(mtls_server.target, **pki.client_args(pki.client)) as client:
        assert client.infer("mlp", mlp_input())["probabilities"].shape == (2, 10)


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate", "expired"])
def test_mutual_tls_refuses(mtls_server: ServerThread, pki: Pki, who: str) -> None:
    args: dict[str, Any] = {
        "no certificate": {"root_certificates": pki.server_ca_pem},
        "another CA's certificate": pki.client_args(pki.stranger),
        "expired": pki.client_args(pki.expired_client),
    }[who]
    with InferClient(mtls_server.target, retries=0, **args) as client:
        with pytest.raises(InferError) as info:
            client.infer("mlp", mlp_input(), timeout=30)
    assert info.value.code.name == "UNAVAILABLE", info.value


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_serves_new_connections_the_new_certificate_and_keeps_open_ones(
    tmp_path: Path, mlp_repository: Path
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = write_leaf(server_leaf(old_ca), tmp_path / "tls.crt", tmp_path / "tls.key")
    with (
        ServerThread(mlp_repository, tls_cert=cert, tls_key=key) as server,
        InferClient(server.target, root_certificates=old_ca.cert_pem.bytes()) as old,
    ):
        requests: queue.Queue[StreamRequest | None] = queue.Queue()
        results = old.infer_stream(iter(requests.get, None))
        requests.put(StreamRequest("mlp", mlp_input(), request_id="before"))
        assert next(results).request_id == "before"

        write_leaf(server_leaf(new_ca), cert, key)
        with InferClient(server.target, root_certificates=new_ca.cert_pem.bytes()) as new:
            assert new.infer("mlp", mlp_input())["probabilities"].shape == (2, 10)
        with (
            InferClient(server.target, root_certificates=old_ca.cert_pem.bytes()) as stale,
            pytest.raises(UnavailableError),
        ):
            stale.health(timeout=10)

        # The stream opened before the rotation goes on, and so does its connection.
        requests.put(StreamRequest("mlp", mlp_input(), request_id="after"))
        after = next(results)
        assert after.request_id == "after" and after.ok, after.error
        assert old.infer("mlp", mlp_input())["probabilities"].shape == (2, 10)
        requests.put(None)
        assert list(results) == []
        assert (reloads(server, "ok"), reloads(server, "error")) == (1, 0)


def test_bad_new_files_are_refused_and_the_old_certificate_keeps_serving(
    tmp_path: Path, mlp_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    cert, key = write_leaf(server_leaf(ca), tmp_path / "tls.crt", tmp_path / "tls.key")
    trusting = {"root_certificates": ca.cert_pem.bytes()}
    with ServerThread(mlp_repository, tls_cert=cert, tls_key=key) as server:
        write_atomically(key, server_leaf(ca).private_key_pem.bytes())  # not the cert's key
        with InferClient(server.target, **trusting) as client:
            assert client.health(timeout=10) == "SERVING"
        assert (reloads(server, "ok"), reloads(server, "error")) == (0, 1)
        assert any(
            "reload failed" in r.message and "does not match" in str(getattr(r, "error", ""))
            for r in caplog.records
        ), caplog.text

        write_leaf(server_leaf(ca), cert, key)  # a good pair: loaded at the next handshake
        with InferClient(server.target, **trusting) as client:
            assert client.health(timeout=10) == "SERVING"
        assert (reloads(server, "ok"), reloads(server, "error")) == (1, 1)


def test_sighup_reloads_the_certificate(tmp_path: Path, mlp_repository: Path) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = write_leaf(server_leaf(old_ca), tmp_path / "tls.crt", tmp_path / "tls.key")
    server = start_tls_process(mlp_repository, tmp_path / "server.log", cert, key)
    try:
        with InferClient(server.target, root_certificates=old_ca.cert_pem.bytes()) as client:
            wait_serving(client)
        write_leaf(server_leaf(new_ca), cert, key)
        # No handshake happens until the signal's reload has been logged: it, not the check
        # at the next handshake, loaded the new files.
        server.send_signal(signal.SIGHUP)
        server.wait_until(lambda: reload_logged(server), TIMEOUT, "the SIGHUP reload logged")
        with InferClient(server.target, root_certificates=new_ca.cert_pem.bytes()) as client:
            assert client.health(timeout=10) == "SERVING"
    finally:
        rc = server.stop()
    assert rc == 0, server.describe()


def start_tls_process(repository: Path, log: Path, cert: Path, key: Path) -> ServerProcess:
    command = [sys.executable, "-m", "inferd.cli", "serve", "--model-repository", str(repository)]
    command += ["--port", "0", "--metrics-port", "-1", "--tls-cert", str(cert)]
    command += ["--tls-key", str(key)]
    server = ServerProcess(repository, command, log, env=server_env(SERVER_DEFAULTS))
    server.wait_until(server.read_ready_line, TIMEOUT, "'inferd serving' line")
    return server


def wait_serving(client: InferClient) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if client.health(timeout=5) == "SERVING":
                return
        except InferError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def reload_logged(server: ServerProcess) -> bool:
    return any(
        "TLS certificates reloaded" in line and "SIGHUP" in line
        for line in server.log_text().splitlines()
    )


# --- refusing to start ------------------------------------------------------------------------


def serve_with(repository: Path, *tls_flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "inferd.cli", "serve", "--model-repository", str(repository)]
    return subprocess.run(
        [*command, "--port", "0", "--metrics-port", "-1", *tls_flags],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=server_env(SERVER_DEFAULTS),
    )


@pytest.mark.parametrize("problem", ["key of another certificate", "missing key file"])
def test_serve_refuses_to_start_on_bad_tls_files(
    tmp_path: Path, mlp_repository: Path, pki: Pki, problem: str
) -> None:
    key = tmp_path / "server.key"
    if problem == "key of another certificate":
        key.write_bytes(server_leaf(pki.server_ca).private_key_pem.bytes())
        expected = "does not match the certificate"
    else:
        expected = f"tls_key {key}: cannot read it"
    result = serve_with(mlp_repository, "--tls-cert", str(pki.server_cert), "--tls-key", str(key))
    assert result.returncode != 0, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "inferd serving" not in result.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_key": Path("k.pem")}, "tls_key is set but tls_cert is not"),
        ({"tls_cert": Path("c.pem")}, "tls_cert is set but tls_key is not"),
        ({"tls_client_ca": Path("ca.pem")}, "tls_client_ca is set but"),
    ],
)
def test_incomplete_tls_settings_are_refused(settings: dict[str, Path], message: str) -> None:
    from inferd.tls import TlsConfigError, TlsFiles

    given = {"cert": None, "key": None, "client_ca": None}
    given.update({k.removeprefix("tls_"): v for k, v in settings.items()})
    with pytest.raises(TlsConfigError, match=message):
        TlsFiles.from_settings(given["cert"], given["key"], given["client_ca"])
