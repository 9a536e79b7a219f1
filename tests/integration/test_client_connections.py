"""`connections=N` opens N HTTP/2 connections to a server and spreads calls over them: counted
as this process's ESTABLISHED TCP sockets to the server's port (a server that balances per
connection, such as several frontend processes on one SO_REUSEPORT port, sees N clients), for
InferClient, AsyncInferClient and the load harness's senders, over plaintext and TLS, to one
server and to several."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest
import trustme
from inprocess_server import ServerThread

from inferd.demo_models import MLP_CONFIG, build_mlp, write_model
from inferd_client import AsyncInferClient, InferClient, StreamRequest

WAIT = 15.0
TOKEN = "connections-test-token"
ESTABLISHED = "01"  # the state column of /proc/net/tcp


def client_connections(port: int) -> int:
    """ESTABLISHED TCP connections from this process to `port` (an in-process server's own
    accepted sockets have `port` as their local port, not their remote one)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                remote_port = int(fields[2].rpartition(":")[2], 16)
                if remote_port == port and fields[3] == ESTABLISHED and fields[9] in inodes:
                    count += 1
    return count


def wait_for_connections(port: int, expected: int) -> int:
    """The count once it is `expected` (connections close a moment after their channel)."""
    deadline = time.monotonic() + WAIT
    while (count := client_connections(port)) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def settled(*servers: ServerThread) -> None:
    """No connection left from an earlier client (a closed channel's goes a moment later)."""
    for server in servers:
        assert wait_for_connections(server.port, 0) == 0, "connections left by an earlier test"


def mlp_input(seed: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("mlp")
    write_model(build_mlp(), repository, "mlp", config_toml=MLP_CONFIG)
    return repository


@pytest.fixture(scope="module")
def servers(mlp_repository: Path) -> Iterator[list[ServerThread]]:
    """Two plaintext servers (the second for the several-servers case), control RPCs on."""
    settings = {"control_token": TOKEN, "model_control": "explicit"}
    with (
        ServerThread(mlp_repository, **settings) as a,
        ServerThread(mlp_repository, **settings) as b,
    ):
        yield [a, b]


@pytest.fixture(scope="module")
def tls_server(
    mlp_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, Path]]:
    """A TLS server, and the file of the CA that signed its certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.private_key_pem.write_to_path(str(root / "server.key"))
    (root / "server.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    with ServerThread(
        mlp_repository, tls_cert=root / "server.pem", tls_key=root / "server.key"
    ) as server:
        yield server, root / "ca.pem"


def test_a_client_with_three_connections_opens_three_and_spreads_its_calls(
    servers: list[ServerThread],
) -> None:
    server = servers[0]
    settled(server)
    with InferClient(server.target, connections=3) as client:
        with futures.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda i: client.infer("mlp", mlp_input(i)), range(60)))
        opened = client_connections(server.port)
    assert all(o["probabilities"].shape == (1, 10) for o in outs)
    assert opened == 3
    assert wait_for_connections(server.port, 0) == 0, "close() left connections open"


async def test_an_async_client_with_three_connections_opens_three(
    servers: list[ServerThread],
) -> None:
    server = servers[0]
    settled(server)
    async with AsyncInferClient(server.target, connections=3) as client:
        outs = await asyncio.gather(*(client.infer("mlp", mlp_input(i)) for i in range(60)))
        opened = client_connections(server.port)
    assert all(o["probabilities"].shape == (1, 10) for o in outs)
    assert opened == 3
    assert wait_for_connections(server.port, 0) == 0, "close() left connections open"


def test_one_connection_is_shared_by_the_clients_of_a_process_as_before(
    servers: list[ServerThread],
) -> None:
    server = servers[0]
    settled(server)
    with InferClient(server.target) as first, InferClient(server.target) as second:
        first.infer("mlp", mlp_input(0))
        second.infer("mlp", mlp_input(1))
        assert client_connections(server.port) == 1


def test_every_call_kind_works_over_pooled_connections(servers: list[ServerThread]) -> None:
    """Health, status, control, streams and watches each take a connection like infer does."""
    server = servers[0]
    settled(server)
    with InferClient(server.target, connections=3, control_token=TOKEN) as client:
        assert client.health() == "SERVING"
        assert client.status("mlp")[0].state == "READY"
        assert "mlp" in client.list_models()
        assert [e.model for e in client.repository_index()] == ["mlp"]
        requests = [StreamRequest("mlp", mlp_input(i), request_id=str(i)) for i in range(5)]
        assert sorted(r.request_id for r in client.infer_stream(requests) if r.ok) == list("01234")
        watch = client.watch("mlp")
        assert next(watch).model == "mlp"
        watch.close()  # type: ignore[attr-defined]
        assert client_connections(server.port) == 3


def served(server: ServerThread) -> int:
    """Predict requests the server has answered OK."""
    with InferClient(server.target, retries=0) as client:
        return sum(v.statistics["request_success"] for v in client.status("mlp", timeout=WAIT))


def test_several_servers_get_the_connections_each(servers: list[ServerThread]) -> None:
    """A balanced target (two addresses: round_robin, health watched, retries): each pooled
    channel connects to every server, so each server gets `connections` connections."""
    before = [served(s) for s in servers]
    settled(*servers)
    with InferClient([s.target for s in servers], connections=2) as client:
        for i in range(40):
            client.infer("mlp", mlp_input(i))
        opened = [client_connections(s.port) for s in servers]
    calls = [served(s) - b for s, b in zip(servers, before, strict=True)]
    assert opened == [2, 2]
    # Both got calls (exact halves only once every connection is up, which takes a moment).
    assert sum(calls) == 40 and min(calls) > 0, calls


def test_tls_clients_open_their_connections(tls_server: tuple[ServerThread, Path]) -> None:
    server, ca = tls_server
    settled(server)

    async def async_calls() -> int:
        async with AsyncInferClient(server.target, root_certificates=ca, connections=3) as c:
            await asyncio.gather(*(c.infer("mlp", mlp_input(i)) for i in range(9)))
            return client_connections(server.port)

    with InferClient(server.target, root_certificates=ca, connections=3) as client:
        for i in range(9):
            client.infer("mlp", mlp_input(i))
        assert client_connections(server.port) == 3
    assert wait_for_connections(server.port, 0) == 0
    assert asyncio.run(async_calls()) == 3


@pytest.mark.parametrize("kind", ["native", "oip"])
async def test_a_harness_sender_spreads_over_its_connections(
    servers: list[ServerThread], kind: str
) -> None:
    from inferd.loadtest.targets import open_sender
    from inferd.loadtest.targets.target import parse_target

    server = servers[0]
    settled(server)
    spec = parse_target(f"{kind}:{server.target},model=mlp,connections=2")
    sender = open_sender(spec, [mlp_input(0), mlp_input(1)], timeout_s=WAIT)
    try:
        await asyncio.gather(*(sender.send(i % 2) for i in range(20)))
        opened = client_connections(server.port)
    finally:
        await sender.close()
    assert opened == 2
    assert wait_for_connections(server.port, 0) == 0
