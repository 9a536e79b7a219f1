"""The framework ceiling (loadtest/bench/ceiling.py) answers both inference RPCs as inferd would
shape them: the model's output names, datatypes and shapes, batch dim from the request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from inferd.demo_models import BATCH_DIM, IR_VERSION, OPSET, write_model
from inferd.loadtest.bench.ceiling import CeilingServer, start_ceiling_server
from inferd_wire.proto.inferd.v1 import predict_pb2, predict_pb2_grpc, tensor_pb2
from inferd_wire.proto.inference import grpc_service_pb2 as oip
from inferd_wire.proto.inference import grpc_service_pb2_grpc as oip_grpc


def build_two_outputs() -> onnx.ModelProto:
    """`x` FP32 [batch, 16] -> `y` FP32 [batch, 4] (MatMul) and `n` INT64 [batch] (ArgMax)."""
    weight = numpy_helper.from_array(np.ones((16, 4), np.float32), name="w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("ArgMax", ["y"], ["n"], axis=1, keepdims=0),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH_DIM, 16])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH_DIM, 4]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [BATCH_DIM]),
        ],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
async def ceiling(tmp_path: Path) -> AsyncIterator[CeilingServer]:
    write_model(build_two_outputs(), tmp_path, "two", version=3)
    server = await start_ceiling_server(tmp_path)
    try:
        yield server
    finally:
        await server.stop(grace=None)


async def test_native_predict_answers_the_models_outputs_at_the_request_batch(
    ceiling: CeilingServer,
) -> None:
    x = np.zeros((5, 16), np.float32)
    request = predict_pb2.PredictRequest(
        model="two",
        id="r1",
        inputs=[tensor_pb2.Tensor(name="x", datatype="FP32", shape=[5, 16], contents=x.tobytes())],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ceiling.port}") as channel:
        response = await predict_pb2_grpc.PredictStub(channel).Predict(request, timeout=5)
    assert (response.model, response.version, response.id) == ("two", 3, "r1")
    outputs = [(t.name, t.datatype, list(t.shape), len(t.contents)) for t in response.outputs]
    assert outputs == [("y", "FP32", [5, 4], 5 * 4 * 4), ("n", "INT64", [5], 5 * 8)]


async def test_oip_model_infer_answers_the_models_outputs_raw(ceiling: CeilingServer) -> None:
    x = np.zeros((2, 16), np.float32)
    request = oip.ModelInferRequest(
        model_name="two",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 16])],
        raw_input_contents=[x.tobytes()],
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ceiling.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(request, timeout=5)
        metadata = await stub.ModelMetadata(oip.ModelMetadataRequest(name="two"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.ModelInfer(oip.ModelInferRequest(model_name="absent"), timeout=5)
    assert (response.model_name, response.model_version) == ("two", "3")
    outputs = [(t.name, t.datatype, list(t.shape)) for t in response.outputs]
    assert outputs == [("y", "FP32", [2, 4]), ("n", "INT64", [2])]
    assert [len(c) for c in response.raw_output_contents] == [2 * 4 * 4, 2 * 8]
    assert [(t.name, list(t.shape)) for t in metadata.inputs] == [("x", [-1, 16])]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
