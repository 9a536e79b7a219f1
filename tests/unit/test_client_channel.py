"""How InferClient's channels are planned from its arguments: targets, balancing, retries, TLS,
connections (inferd_client/_channel.py). No server: the servers' side is in tests/integration."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from inferd_client._channel import (
    CONNECTION_INDEX_OPTION,
    DEFAULT_RETRIES,
    LOCAL_SUBCHANNEL_POOL,
    RETRY_BUFFER_BYTES,
    channel_target,
    plan_channel,
    read_pem,
    retry_count,
    service_config,
)

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:8001", ("127.0.0.1:8001", False)),
        ("inferd.internal:8001", ("inferd.internal:8001", False)),
        (["127.0.0.1:1", "127.0.0.2:2"], ("ipv4:127.0.0.1:1,127.0.0.2:2", True)),
        ("127.0.0.1:1, 127.0.0.2:2", ("ipv4:127.0.0.1:1,127.0.0.2:2", True)),
        (["[::1]:1", "[::1]:2"], ("ipv6:[::1]:1,[::1]:2", True)),
        ("dns:///inferd.internal:8001", ("dns:///inferd.internal:8001", True)),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", ("ipv4:127.0.0.1:1,127.0.0.1:2", True)),
        ("unix:/run/inferd.sock", ("unix:/run/inferd.sock", False)),
    ],
)
def test_targets(target: str | list[str], expected: tuple[str, bool]) -> None:
    assert channel_target(target) == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (["localhost:1", "localhost:2"], "dns:///"),
        (["127.0.0.1:1", "[::1]:2"], "cannot be mixed"),
        (["127.0.0.1", "127.0.0.2"], "IP:PORT"),
        ([], "no address"),
    ],
)
def test_bad_address_lists_are_refused(target: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_target(target)


def test_service_config() -> None:
    assert service_config(balanced=False, retries=0) is None
    balanced = json.loads(service_config(balanced=True, retries=0) or "")
    assert balanced == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
    }
    retried = json.loads(service_config(balanced=False, retries=2) or "")
    (method,) = retried["methodConfig"]
    assert {"service": "inferd.v1.Predict", "method": "Predict"} in method["name"]
    assert {"service": "inference.GRPCInferenceService", "method": "ModelInfer"} in method["name"]
    assert all(name["method"] != "PredictStream" for name in method["name"])
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


@pytest.mark.parametrize("retries", [0, False])
def test_retries_off_leaves_grpc_defaults(retries: int | bool) -> None:
    options = dict(plan_channel("127.0.0.1:1", max_message_bytes=1024, retries=retries).options)
    assert "grpc.service_config" not in options
    assert "grpc.per_rpc_retry_buffer_size" not in options


def test_retries_beyond_grpcs_cap_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        plan_channel("127.0.0.1:1", max_message_bytes=1024, retries=5)


def test_caller_options_win() -> None:
    mine = ("grpc.service_config", "{}")
    plan = plan_channel(["127.0.0.1:1", "127.0.0.1:2"], max_message_bytes=1024, options=[mine])
    options = dict(plan.options)
    assert options["grpc.service_config"] == "{}"
    assert options["grpc.per_rpc_retry_buffer_size"] == RETRY_BUFFER_BYTES
    assert options["grpc.max_receive_message_length"] == 1024


def test_tls_arguments(tmp_path: Path) -> None:
    plain = plan_channel("127.0.0.1:1", max_message_bytes=1024)
    assert plain.credentials is None
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM)
    assert read_pem("root_certificates", ca) == PEM
    assert read_pem("root_certificates", str(ca)) == PEM
    assert read_pem("root_certificates", PEM.decode()) == PEM
    plan = plan_channel(
        "127.0.0.1:1", max_message_bytes=1024, root_certificates=ca, server_name_override="x"
    )
    assert isinstance(plan.credentials, grpc.ChannelCredentials)
    assert ("grpc.ssl_target_name_override", "x") in plan.options
    # A name to check alone: TLS with the system's CAs.
    assert plan_channel("a:1", max_message_bytes=1024, server_name_override="x").credentials


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"credentials": grpc.ssl_channel_credentials(), "root_certificates": PEM}, "either"),
        ({"certificate_chain": PEM}, "go together"),
        ({"private_key": PEM}, "go together"),
        ({"root_certificates": "/no/such/ca.pem"}, "cannot read"),
    ],
)
def test_inconsistent_tls_arguments_are_refused(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan_channel("127.0.0.1:1", max_message_bytes=1024, **arguments)  # type: ignore[arg-type]


# --- connections ---------------------------------------------------------------------------


def test_one_connection_is_one_channel_with_the_options_as_before() -> None:
    plan = plan_channel("127.0.0.1:1", max_message_bytes=1024)
    assert plan.connections == 1
    assert plan.channel_options() == [plan.options]
    assert LOCAL_SUBCHANNEL_POOL not in plan.options
    assert all(key != CONNECTION_INDEX_OPTION for key, _ in plan.options)


def test_each_pooled_channel_has_the_same_settings_and_a_connection_of_its_own(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM)
    plan = plan_channel(
        ["127.0.0.1:1", "127.0.0.1:2"],
        max_message_bytes=1024,
        root_certificates=ca,
        server_name_override="inferd.test",
        options=[("grpc.keepalive_time_ms", 30_000)],
        connections=3,
    )
    assert plan.target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert isinstance(plan.credentials, grpc.ChannelCredentials)
    channels = plan.channel_options()
    assert len(channels) == 3
    for index, options in enumerate(channels):
        # Balancing, retries, TLS name, message limits and the caller's options, on every one.
        assert options[: len(plan.options)] == plan.options
        assert options[len(plan.options) :] == [
            LOCAL_SUBCHANNEL_POOL,
            (CONNECTION_INDEX_OPTION, index),
        ]
    assert dict(channels[0])["grpc.service_config"] == dict(channels[2])["grpc.service_config"]


@pytest.mark.parametrize("connections", [0, -1, True, 1.5, "2"])
def test_connections_other_than_a_positive_count_are_refused(connections: object) -> None:
    with pytest.raises(ValueError, match="connections: 1 or more"):
        plan_channel("127.0.0.1:1", max_message_bytes=1024, connections=connections)  # type: ignore[arg-type]


def test_a_list_of_one_address_is_one_server() -> None:
    assert channel_target(["localhost:8001"]) == ("localhost:8001", False)


def test_retries_true_means_the_default_policy() -> None:
    assert retry_count(True) == DEFAULT_RETRIES and retry_count(False) == 0
