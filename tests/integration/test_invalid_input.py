"""Every bad request gets its exact status code and a message naming what is wrong, and never
affects other requests or the server's health.

Requests are built with the generated stubs, since the client library cannot express most of
these malformed messages.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration_support import (
    ServerFactory,
    ServerProcess,
    assert_outputs_match,
    fp32_tensor,
    mlp_input,
    model_file,
    raw_tensor,
    reference_outputs,
    text_input,
)

from inferd.demo_models import build_text_encoder, write_model
from inferd_client import AsyncInferClient, InferClient, InferError
from inferd_wire.proto.inferd.v1 import predict_pb2, predict_pb2_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
# Generous: a request the server handled badly (e.g. allocating a declared shape) shows up as
# DEADLINE_EXCEEDED instead of hanging the suite.
RPC_TIMEOUT = 20.0


def _i64(shape: list[int]) -> bytes:
    return bytes(8 * int(np.prod(shape)))


def _bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@dataclass(frozen=True)
class Case:
    request: Callable[[], predict_pb2.PredictRequest]
    code: grpc.StatusCode
    # Every one of these must appear in the status message.
    mentions: tuple[str, ...]


def _req(model: str, *inputs, version: int | None = None, **kw) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model=model, inputs=list(inputs), **kw)
    if version is not None:
        request.version = version
    return request


CASES: dict[str, Case] = {
    "unknown-model": Case(
        lambda: _req("no_such_model", fp32_tensor("input", [1, 64])),
        NOT_FOUND,
        ("'no_such_model'",),
    ),
    "unknown-version": Case(
        lambda: _req("mlp", fp32_tensor("input", [1, 64]), version=7),
        NOT_FOUND,
        ("'mlp'", "version 7"),
    ),
    "unknown-input-name": Case(
        lambda: _req("mlp", fp32_tensor("inputs", [1, 64])),
        INVALID,
        ("'inputs'", "'input'"),
    ),
    "no-inputs-at-all": Case(lambda: _req("mlp"), INVALID, ("missing", "'input'")),
    "missing-second-input": Case(
        lambda: _req("text_encoder", raw_tensor("input_ids", "INT64", [1, 4], _i64([1, 4]))),
        INVALID,
        ("missing", "'attention_mask'"),
    ),
    "duplicate-input": Case(
        lambda: _req("mlp", fp32_tensor("input", [1, 64]), fp32_tensor("input", [1, 64])),
        INVALID,
        ("'input'", "more than once"),
    ),
    "wrong-datatype": Case(
        lambda: _req("mlp", raw_tensor("input", "FP64", [1, 64], bytes(8 * 64))),
        INVALID,
        ("'input'", "FP64", "FP32"),
    ),
    "empty-datatype": Case(
        lambda: _req("mlp", raw_tensor("input", "", [1, 64], bytes(4 * 64))),
        INVALID,
        ("'input'", "datatype"),
    ),
    "unknown-datatype": Case(
        lambda: _req("mlp", raw_tensor("input", "FLOAT128", [1, 64], bytes(16 * 64))),
        INVALID,
        ("'input'", "FLOAT128"),
    ),
    "wrong-rank": Case(
        lambda: _req("mlp", fp32_tensor("input", [64])),
        INVALID,
        ("'input'", "rank 1"),
    ),
    "wrong-rank-higher": Case(
        lambda: _req("mlp", fp32_tensor("input", [1, 64, 1])),
        INVALID,
        ("'input'", "rank 3"),
    ),
    "wrong-non-batch-dim": Case(
        lambda: _req("mlp", fp32_tensor("input", [1, 63])),
        INVALID,
        ("'input'", "dim 1 is 63", "64"),
    ),
    "wrong-cnn-spatial-dim": Case(
        lambda: _req("cnn", fp32_tensor("image", [1, 3, 64, 32])),
        INVALID,
        ("'image'", "dim 3 is 32"),
    ),
    "negative-dim": Case(
        lambda: _req("mlp", raw_tensor("input", "FP32", [-1, 64], bytes(4 * 64))),
        INVALID,
        ("'input'", "negative"),
    ),
    "zero-batch": Case(
        lambda: _req("mlp", raw_tensor("input", "FP32", [0, 64])),
        INVALID,
        ("'input'", "batch dimension"),
    ),
    "contents-shorter": Case(
        lambda: _req("mlp", raw_tensor("input", "FP32", [2, 64], bytes(2 * 64 * 4 - 4))),
        INVALID,
        ("'input'", "508 bytes", "needs 512"),
    ),
    "contents-longer": Case(
        lambda: _req("mlp", raw_tensor("input", "FP32", [2, 64], bytes(2 * 64 * 4 + 1))),
        INVALID,
        ("'input'", "513 bytes", "needs 512"),
    ),
    "contents-empty": Case(
        lambda: _req("mlp", raw_tensor("input", "FP32", [1, 64], b"")),
        INVALID,
        ("'input'", "0 bytes", "needs 256"),
    ),
    "batch-over-max-batch-size": Case(
        lambda: _req("mlp", fp32_tensor("input", [65, 64])),
        INVALID,
        ("'input'", "65", "max_batch_size 64"),
    ),
    "batch-dims-disagree": Case(
        lambda: _req(
            "text_encoder",
            raw_tensor("input_ids", "INT64", [2, 5], _i64([2, 5])),
            raw_tensor("attention_mask", "INT64", [3, 5], _i64([3, 5])),
        ),
        INVALID,
        ("'attention_mask'", "'input_ids'", "3", "2"),
    ),
    # Both inputs name their dim 1 'sequence': only the model could notice otherwise, and it
    # would fail the batch (INTERNAL).
    "sequence-dims-disagree": Case(
        lambda: _req(
            "text_encoder",
            raw_tensor("input_ids", "INT64", [1, 5], _i64([1, 5])),
            raw_tensor("attention_mask", "INT64", [1, 6], _i64([1, 6])),
        ),
        INVALID,
        ("'attention_mask'", "'input_ids'", "'sequence'"),
    ),
    "huge-shape-tiny-contents": Case(
        lambda: _req("mlp", raw_tensor("input", "FP32", [2**40, 64], bytes(16))),
        INVALID,
        ("'input'", str(2**40)),
    ),
    "huge-variable-dim-tiny-contents": Case(
        lambda: _req(
            "text_encoder",
            raw_tensor("input_ids", "INT64", [1, 2**40], bytes(16)),
            raw_tensor("attention_mask", "INT64", [1, 2**40], bytes(16)),
        ),
        INVALID,
        ("'input_ids'", "limit"),
    ),
    "huge-int64-dims": Case(
        lambda: _req(
            "text_encoder",
            raw_tensor("input_ids", "INT64", [1, 2**62], b""),
            raw_tensor("attention_mask", "INT64", [1, 2**62], b""),
        ),
        INVALID,
        ("'input_ids'", "limit"),
    ),
    "bytes-length-prefix-runs-past-end": Case(
        lambda: _req(
            "echo_bytes", raw_tensor("text", "BYTES", [2], _bytes_elements(b"abc") + b"\1\0")
        ),
        INVALID,
        ("'text'", "length prefix runs past the end"),
    ),
    "bytes-element-longer-than-contents": Case(
        lambda: _req("echo_bytes", raw_tensor("text", "BYTES", [1], struct.pack("<I", 16) + b"ab")),
        INVALID,
        ("'text'", "16 bytes"),
    ),
    "bytes-too-few-for-count": Case(
        lambda: _req("echo_bytes", raw_tensor("text", "BYTES", [3], _bytes_elements(b"a"))),
        INVALID,
        ("'text'", "3 BYTES elements"),
    ),
    "bytes-left-over": Case(
        lambda: _req("echo_bytes", raw_tensor("text", "BYTES", [1], _bytes_elements(b"a") + b"z")),
        INVALID,
        ("'text'", "left over"),
    ),
    "bytes-not-utf8": Case(
        lambda: _req(
            "echo_bytes", raw_tensor("text", "BYTES", [2], _bytes_elements(b"ok", b"\xff\xfe"))
        ),
        INVALID,
        ("'text'", "element 1", "utf-8"),
    ),
    "model-name-dotdot": Case(
        lambda: _req("../etc", fp32_tensor("input", [1, 64])), INVALID, ("'../etc'",)
    ),
    "model-name-slash": Case(
        lambda: _req("a/b", fp32_tensor("input", [1, 64])), INVALID, ("'a/b'",)
    ),
    "model-name-empty": Case(
        lambda: _req("", fp32_tensor("input", [1, 64])), INVALID, ("model", "empty")
    ),
}


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[predict_pb2_grpc.PredictStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield predict_pb2_grpc.PredictStub(channel)


def _expect_error(stub, request, code, mentions, context=""):
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=RPC_TIMEOUT)
    error = info.value
    details = error.details() or ""
    assert error.code() == code, f"{context}: got {error.code()} {details!r}, wanted {code}"
    for word in mentions:
        assert word in details, f"{context}: {word!r} not in {details!r}"
    return details


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_exact_code_and_names_the_field(stub, name: str):
    case = CASES[name]
    _expect_error(stub, case.request(), case.code, case.mentions, name)


def test_huge_declared_shape_is_refused_before_any_allocation(server: ServerProcess, stub):
    """[2**40, 64] FP32 would be 256 TiB: refused from the shape alone (a server that tried to
    allocate or parse it would fail otherwise, or time out), and the server stays up."""
    for name in ("huge-shape-tiny-contents", "huge-variable-dim-tiny-contents", "huge-int64-dims"):
        case = CASES[name]
        _expect_error(stub, case.request(), case.code, case.mentions, name)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert server.process.poll() is None, server.describe()


def test_bad_requests_leave_the_server_serving_good_ones(
    server: ServerProcess, stub, demo_repository: Path
):
    """After every case above (run again here, in one go), good requests still succeed and
    health is SERVING."""
    for name, case in CASES.items():
        _expect_error(stub, case.request(), case.code, case.mentions, name)
    with InferClient(server.target) as client:
        inputs = mlp_input(np.random.default_rng(70), 4)
        served = client.infer("mlp", inputs, timeout=RPC_TIMEOUT)
        assert_outputs_match(
            served, reference_outputs(model_file(demo_repository, "mlp"), inputs), "mlp"
        )
        assert client.health() == "SERVING"
    assert server.process.poll() is None


# --- limits: a server with small ones ----------------------------------------------------------

MAX_ELEMENTS = 1000
MAX_MESSAGE_BYTES = 100_000


@pytest.fixture(scope="module")
def limited_server(module_server_factory: ServerFactory, demo_repository: Path) -> ServerProcess:
    return module_server_factory(
        demo_repository,
        env={
            "INFERD_MAX_ELEMENTS_PER_REQUEST": str(MAX_ELEMENTS),
            "INFERD_MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
        },
    )


@pytest.fixture
def limited_stub(limited_server: ServerProcess) -> Iterator[predict_pb2_grpc.PredictStub]:
    with grpc.insecure_channel(limited_server.target) as channel:
        yield predict_pb2_grpc.PredictStub(channel)


def test_more_elements_than_the_limit_is_invalid_argument(limited_stub):
    request = _req("mlp", fp32_tensor("input", [16, 64]))  # 1024 > 1000 elements
    _expect_error(limited_stub, request, INVALID, ("'input'", "1024", f"limit of {MAX_ELEMENTS}"))


def test_elements_of_all_inputs_count_towards_the_limit(limited_stub):
    request = _req(  # 600 + 600 elements: each under the limit, together over it
        "text_encoder",
        raw_tensor("input_ids", "INT64", [10, 60], _i64([10, 60])),
        raw_tensor("attention_mask", "INT64", [10, 60], _i64([10, 60])),
    )
    _expect_error(limited_stub, request, INVALID, ("'attention_mask'", "1200", "limit"))


def test_requests_within_the_limits_succeed(limited_server: ServerProcess, demo_repository):
    with InferClient(limited_server.target) as client:
        inputs = mlp_input(np.random.default_rng(71), 15)  # 960 elements, 3.8 kB
        served = client.infer("mlp", inputs, timeout=RPC_TIMEOUT)
    assert_outputs_match(
        served, reference_outputs(model_file(demo_repository, "mlp"), inputs), "mlp"
    )


def test_message_over_max_message_bytes_is_resource_exhausted(
    limited_server: ServerProcess, limited_stub
):
    """gRPC itself refuses a 200 kB message to a server whose limit is 100 kB."""
    request = _req("cnn", fp32_tensor("image", [4, 3, 64, 64]))
    assert request.ByteSize() > 2 * MAX_MESSAGE_BYTES * 0.98
    with pytest.raises(grpc.RpcError) as info:
        limited_stub.Predict(request, timeout=RPC_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    with grpc.insecure_channel(limited_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ok = limited_stub.Predict(_req("mlp", fp32_tensor("input", [2, 64])), timeout=RPC_TIMEOUT)
    assert [t.name for t in ok.outputs] == ["probabilities"]


# --- one bad request in a batch of good ones --------------------------------------------------

SHARED_BATCH = 4


@pytest.fixture(scope="module")
def batched_server(module_server_factory: ServerFactory, tmp_path_factory) -> ServerProcess:
    """text_encoder whose batches close only at SHARED_BATCH rows (or after 5 s), so requests
    sent together share one execution deterministically."""
    repo = tmp_path_factory.mktemp("batched_text_encoder")
    write_model(
        build_text_encoder(),
        repo,
        "text_encoder",
        config_toml=f"max_batch_size = {SHARED_BATCH}\nmax_queue_delay_us = 5000000\n",
    )
    return module_server_factory(repo)


async def _shared_batch(
    server: ServerProcess, bad_rows: set[int]
) -> tuple[list[dict[str, np.ndarray]], list[object]]:
    """SHARED_BATCH one-row requests at once; rows in `bad_rows` carry a token id outside the
    vocabulary (1000), which only the model itself can notice. Returns the inputs and each
    outcome (outputs or InferError)."""
    rng = np.random.default_rng(72)
    inputs = []
    for i in range(SHARED_BATCH):
        x = text_input(rng, 1, 6)
        if i in bad_rows:
            x["input_ids"][0, 2] = 5000
        inputs.append(x)
    async with AsyncInferClient(server.target) as aclient:

        async def one(x):
            try:
                return await aclient.infer("text_encoder", x, timeout=RPC_TIMEOUT)
            except InferError as exc:
                return exc

        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one(x) for x in inputs)), 2 * RPC_TIMEOUT
        )
    return inputs, outcomes


async def test_good_requests_share_a_batch(batched_server: ServerProcess):
    _, outcomes = await _shared_batch(batched_server, bad_rows=set())
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    with InferClient(batched_server.target) as c:
        assert c.status("text_encoder")[0].statistics["batch_sizes"] == {SHARED_BATCH: 1}


async def test_a_bad_request_does_not_fail_the_good_ones_in_its_batch(
    batched_server: ServerProcess,
):
    """Only the model notices the bad token id, and it fails the whole batch; the good
    requests that shared it must still get their outputs."""
    inputs, outcomes = await _shared_batch(batched_server, bad_rows={0})
    assert isinstance(outcomes[0], InferError), outcomes[0]
    print(f"\nout-of-vocabulary request: {outcomes[0]!r}")
    path = model_file(batched_server.repository, "text_encoder")
    for i, (x, outcome) in enumerate(zip(inputs[1:], outcomes[1:], strict=True), start=1):
        assert isinstance(outcome, dict), f"good request {i} got {outcome!r}"
        assert_outputs_match(outcome, reference_outputs(path, x), f"good request {i}")
