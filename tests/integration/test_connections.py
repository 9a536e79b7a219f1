"""The server's connection settings (`[connections]`, inferd/connections.py) reach gRPC and do
what they say: idle connections are closed, clients that ping too often are sent away."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from inprocess_server import ServerThread

from inferd.app import channel_options
from inferd.config import ServerConfig
from inferd.connections import ConnectionConfig

WAIT = 15.0


@pytest.fixture(scope="module")
def empty_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no_models")


def test_defaults_become_grpc_server_options() -> None:
    options = dict(channel_options(1 << 20, ConnectionConfig()))
    assert options["grpc.keepalive_time_ms"] == 7_200_000
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.max_connection_idle_ms"] == 300_000
    # Unset: gRPC's "never".
    assert "grpc.max_connection_age_ms" not in options
    assert "grpc.max_connection_age_grace_ms" not in options


def test_connection_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERD_CONNECTIONS__MAX_CONNECTION_AGE_S", "1800")
    monkeypatch.setenv("INFERD_CONNECTIONS__MAX_CONNECTION_AGE_GRACE_S", "30")
    options = dict(channel_options(1 << 20, ServerConfig.load(None).connections))
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000


@pytest.fixture
def server(request: pytest.FixtureRequest, empty_repository: Path) -> Iterator[ServerThread]:
    with ServerThread(empty_repository, connections=request.param) as server:
        yield server


def check_health(channel: grpc.Channel) -> None:
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)


@pytest.mark.parametrize("server", [{"max_connection_idle_s": 0.3}], indirect=True)
def test_an_idle_connection_is_closed_after_max_connection_idle(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        states: list[tuple[float, grpc.ChannelConnectivity]] = []
        check_health(channel)
        connected = time.monotonic()
        channel.subscribe(lambda state: states.append((time.monotonic(), state)))
        deadline = connected + WAIT
        while not any(s == grpc.ChannelConnectivity.IDLE for _, s in states):
            assert time.monotonic() < deadline, f"still connected after {WAIT} s: {states}"
            time.sleep(0.02)
        closed_after = next(t for t, s in states if s == grpc.ChannelConnectivity.IDLE) - connected
        # The server's GOAWAY puts the channel back to IDLE; the next call reconnects.
        check_health(channel)
    assert 0.25 <= closed_after < WAIT, states


GREEDY_CLIENT = [
    ("grpc.keepalive_time_ms", 100),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def watch_until_it_ends(channel: grpc.Channel, timeout: float) -> grpc.RpcError:
    """A long call with nothing to send, so only pings cross the connection; how it ended."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), timeout=timeout
    )
    with pytest.raises(grpc.RpcError) as info:
        for _ in watch:
            pass
    return info.value


@pytest.mark.parametrize("server", [{}], indirect=True)
def test_a_client_pinging_too_often_is_sent_away_with_too_many_pings(
    server: ServerThread,
) -> None:
    with grpc.insecure_channel(server.target, options=GREEDY_CLIENT) as channel:
        ended = watch_until_it_ends(channel, WAIT)
    assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
    assert "too many pings" in (ended.details() or "").lower(), ended.details()


@pytest.mark.parametrize("server", [{"min_client_ping_interval_s": 0.05}], indirect=True)
def test_pings_as_often_as_min_client_ping_interval_allows_are_accepted(
    server: ServerThread,
) -> None:
    """The same client, on a server that allows it: the setting reached gRPC (whose own
    default, 5 min, would send it away as above)."""
    with grpc.insecure_channel(server.target, options=GREEDY_CLIENT) as channel:
        ended = watch_until_it_ends(channel, 2.0)
    assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended
