"""PredictStream: good and bad requests mixed on one stream. Every id is answered exactly once;
a bad request carries its own status code and the stream goes on; good ones carry outputs equal
to in-process ONNX Runtime's; the stream then ends cleanly (status OK)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from integration_support import (
    ServerProcess,
    assert_outputs_match,
    cnn_input,
    echo_input,
    fp32_tensor,
    mlp_input,
    model_file,
    predict_request,
    raw_tensor,
    reference_outputs,
    text_input,
)

from inferd_client import AsyncInferClient, InferClient, StreamRequest
from inferd_wire.codec import from_wire
from inferd_wire.proto.inferd.v1 import predict_pb2, predict_pb2_grpc

OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
WAIT = 60.0


# (model, inputs of a good request or None, expected code, the request)
Planned = tuple[str, dict | None, grpc.StatusCode, predict_pb2.PredictRequest]


def mixed_requests(seed: int) -> list[Planned]:
    """Good and bad requests interleaved, with ids "0".."N" in order."""
    rng = np.random.default_rng(seed)
    out: list[Planned] = []

    def good(model: str, inputs: dict) -> None:
        out.append((model, inputs, OK, predict_request(model, inputs)))

    def bad(model: str, code: grpc.StatusCode, request: predict_pb2.PredictRequest) -> None:
        out.append((model, None, code, request))

    for round_ in range(3):
        good("mlp", mlp_input(rng, 1 + round_))
        bad("no_such_model", NOT_FOUND, predict_request("no_such_model", mlp_input(rng, 1)))
        good("text_encoder", text_input(rng, 2, 4 + round_))
        bad(
            "mlp",
            INVALID,
            predict_pb2.PredictRequest(model="mlp", inputs=[fp32_tensor("input", [1, 63])]),
        )
        good("echo_bytes", echo_input([f"naïve {round_} ✓", ""]))
        bad("mlp", NOT_FOUND, predict_request("mlp", mlp_input(rng, 1), version=7))
        bad(
            "echo_bytes",
            INVALID,
            predict_pb2.PredictRequest(
                model="echo_bytes",
                inputs=[raw_tensor("text", "BYTES", [1], struct.pack("<I", 2) + b"\xff\xfe")],
            ),
        )
        good("cnn", cnn_input(rng, 1))
        bad("../etc", INVALID, predict_request("../etc", mlp_input(rng, 1)))
    for i, (_, _, _, request) in enumerate(out):
        request.id = str(i)
    return out


def _check_outputs(repo: Path, model: str, inputs: dict, served: dict, context: str) -> None:
    assert_outputs_match(served, reference_outputs(model_file(repo, model), inputs), context)


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[predict_pb2_grpc.PredictStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield predict_pb2_grpc.PredictStub(channel)


def test_raw_stream_answers_every_id_once_with_its_own_status(stub, demo_repository: Path):
    sent = mixed_requests(90)
    call = stub.PredictStream(iter([request for *_, request in sent]), timeout=WAIT)
    answers = list(call)
    assert call.code() == OK, call.details()

    ids = [a.id for a in answers]
    assert sorted(ids, key=int) == [str(i) for i in range(len(sent))], ids
    for answer in answers:
        model, inputs, code, _ = sent[int(answer.id)]
        context = f"id {answer.id} ({model})"
        if code == OK:
            assert answer.WhichOneof("result") == "response", (context, answer.error)
            assert answer.response.id == answer.id and answer.response.model == model
            served = {
                t.name: from_wire(t.datatype, t.shape, t.contents) for t in answer.response.outputs
            }
            _check_outputs(demo_repository, model, inputs, served, context)
        else:
            assert answer.WhichOneof("result") == "error", context
            assert answer.error.code == code.value[0], (context, answer.error)
            assert answer.error.message, context


def test_empty_stream_ends_cleanly(stub):
    call = stub.PredictStream(iter(()), timeout=WAIT)
    assert list(call) == []
    assert call.code() == OK


def test_stream_longer_than_the_window_is_fully_answered(stub, demo_repository: Path):
    """300 requests on one stream, more than the server's default stream_window (256)."""
    rng = np.random.default_rng(91)
    inputs = [mlp_input(rng, 1) for _ in range(300)]
    requests = (predict_request("mlp", x, id=str(i)) for i, x in enumerate(inputs))
    call = stub.PredictStream(requests, timeout=WAIT)
    answers = {a.id: a for a in call}
    assert call.code() == OK
    assert sorted(answers, key=int) == [str(i) for i in range(300)]
    batch = {"input": np.concatenate([x["input"] for x in inputs])}
    expected = reference_outputs(model_file(demo_repository, "mlp"), batch)["probabilities"]
    for i, answer in answers.items():
        (tensor,) = answer.response.outputs
        got = from_wire(tensor.datatype, tensor.shape, tensor.contents)
        want = expected[int(i) : int(i) + 1]
        assert_outputs_match({"p": got}, {"p": want}, f"id {i}")


def _stream_requests(seed: int) -> list[tuple[StreamRequest, grpc.StatusCode]]:
    rng = np.random.default_rng(seed)
    plan = [
        (StreamRequest("mlp", mlp_input(rng, 2)), OK),
        (StreamRequest("nope", mlp_input(rng, 1)), NOT_FOUND),
        (StreamRequest("text_encoder", text_input(rng, 1, 9)), OK),
        (StreamRequest("mlp", {"input": np.zeros((1, 5), np.float32)}), INVALID),
        (StreamRequest("echo_bytes", echo_input(["grüße", "🙂"])), OK),
        (StreamRequest("mlp", mlp_input(rng, 1), version=7), NOT_FOUND),
        (StreamRequest("mlp", mlp_input(rng, 1), outputs=["logits"]), INVALID),
        (StreamRequest("cnn", cnn_input(rng, 2)), OK),
    ]
    return [
        (
            StreamRequest(
                r.model, r.inputs, r.outputs, r.version, request_id=str(i), timeout_us=r.timeout_us
            ),
            code,
        )
        for i, (r, code) in enumerate(plan * 2)
    ]


def _check_results(plan, results, repo: Path) -> None:
    assert sorted((r.request_id for r in results), key=int) == [str(i) for i in range(len(plan))]
    for result in results:
        request, code = plan[int(result.request_id)]
        context = f"id {result.request_id} ({request.model})"
        assert result.model == request.model, context
        if code == OK:
            assert result.ok, (context, result.error)
            _check_outputs(repo, request.model, dict(request.inputs), result.outputs, context)
        else:
            assert not result.ok and result.outputs is None, context
            assert result.error.code == code, (context, result.error)


def test_sync_client_infer_stream_mixed(server: ServerProcess, demo_repository: Path):
    plan = _stream_requests(92)
    with InferClient(server.target) as client:
        results = list(client.infer_stream(request for request, _ in plan))
    _check_results(plan, results, demo_repository)


async def test_async_client_infer_stream_mixed(server: ServerProcess, demo_repository: Path):
    plan = _stream_requests(93)

    async def requests():
        for request, _ in plan:
            yield request

    async with AsyncInferClient(server.target) as client:
        results = [r async for r in client.infer_stream(requests())]
        # The channel is still usable after the stream ended.
        assert await client.health() == "SERVING"
    _check_results(plan, results, demo_repository)
