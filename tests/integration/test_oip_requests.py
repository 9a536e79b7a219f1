"""ModelInfer requests that tritonclient's InferInput never builds: typed `contents` instead of
raw_input_contents, and malformed tensors. They are made and sent with Triton's own generated
code (`triton_raw_infer`, in the tritonclient process), and each malformed one gets the same
status code and message as the same tensor sent to the native API.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import test_oip_tritonclient
from integration_support import (
    ServerProcess,
    assert_outputs_match,
    model_file,
    predict_request,
    reference_outputs,
)
from test_oip_tritonclient import TritonClientProcess, triton_raw_infer

from inferd_wire.proto.inferd.v1 import predict_pb2_grpc

# The tritonclient process and the served repository, shared with test_oip_tritonclient.
triton = test_oip_tritonclient.triton
oip_repository = test_oip_tritonclient.oip_repository
oip_server = test_oip_tritonclient.oip_server


def _unpack_bytes(raw: bytes, shape: list[int]) -> np.ndarray:
    out, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        out.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return np.array(out, dtype=object).reshape(shape)


def _typed(name: str, datatype: str, array: np.ndarray, field: str) -> dict[str, Any]:
    flat = array.ravel()
    values = [v.encode() for v in flat] if datatype == "BYTES" else flat.tolist()
    return {
        "name": name,
        "datatype": datatype,
        "shape": list(array.shape),
        "contents": {field: values},
    }


def test_typed_contents_infer_like_raw(
    triton: TritonClientProcess, oip_server: ServerProcess, oip_repository: Path
):
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1], [1, 1, 0]], dtype=np.int64)
    text = np.array(["typed", "\u00e9t\u00e9"], dtype=object)
    cases = {
        "mlp": [_typed("input", "FP32", x, "fp32_contents")],
        "text_encoder": [
            _typed("input_ids", "INT64", ids, "int64_contents"),
            _typed("attention_mask", "INT64", mask, "int64_contents"),
        ],
        "echo_bytes": [_typed("text", "BYTES", text, "bytes_contents")],
    }
    arrays = {
        "mlp": {"input": x},
        "text_encoder": {"input_ids": ids, "attention_mask": mask},
        "echo_bytes": {"text": text},
    }
    for model, tensors in cases.items():
        code, message, outputs = triton.run(triton_raw_infer, oip_server.target, model, tensors)
        assert code == "OK", (model, message)
        served = {}
        for name, (datatype, shape, raw) in outputs.items():
            if datatype == "BYTES":
                served[name] = _unpack_bytes(raw, shape)
            else:
                assert datatype == "FP32"
                served[name] = np.frombuffer(raw, np.float32).reshape(shape)
        expected = reference_outputs(model_file(oip_repository, model), arrays[model])
        assert_outputs_match(served, expected, f"typed contents, {model}")


def _fp32(name: str, shape: list[int], count: int, field: str = "fp32_contents") -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape, "contents": {field: [1.0] * count}}


RAW_FP32 = {"name": "input", "datatype": "FP32", "shape": [1, 64]}

# (model, tensors, raw_input_contents, what the message must mention)
OIP_CASES: dict[str, tuple[str, list[dict[str, Any]], list[bytes] | None, tuple[str, ...]]] = {
    "FP16 typed": (
        "fp16_add",
        [{"name": "x", "datatype": "FP16", "shape": [1, 4]}],
        None,
        ("input 'x'", "FP16", "raw_input_contents"),
    ),
    "typed count": (
        "mlp",
        [_fp32("input", [1, 64], 63)],
        None,
        ("input 'input'", "fp32_contents holds 63 elements", "needs 64"),
    ),
    "typed field": (
        "mlp",
        [_fp32("input", [1, 64], 64, field="fp64_contents")],
        None,
        ("input 'input'", "fp32_contents holds 0 elements"),
    ),
    "raw count": (
        "mlp",
        [RAW_FP32],
        [bytes(256), bytes(4)],
        ("raw_input_contents has 2 entries for 1 inputs",),
    ),
    "raw and typed": (
        "mlp",
        [_fp32("input", [1, 64], 64)],
        [bytes(256)],
        ("input 'input'", "contents must be empty"),
    ),
}


@pytest.mark.parametrize("case", sorted(OIP_CASES))
def test_malformed_oip_requests_are_invalid_argument(
    triton: TritonClientProcess, oip_server: ServerProcess, case: str
):
    model, tensors, raw, mentions = OIP_CASES[case]
    code, message, _ = triton.run(triton_raw_infer, oip_server.target, model, tensors, raw)
    assert code == "INVALID_ARGUMENT", (case, code, message)
    for text in mentions:
        assert text in message, (case, message)


# The same bad tensor through both frontends: (model, name, datatype, shape, raw contents).
PARITY_CASES = {
    "unknown model": ("no_such_model", "input", "FP32", [1, 64], bytes(256)),
    "unknown input": ("mlp", "inputs", "FP32", [1, 64], bytes(256)),
    "wrong datatype": ("mlp", "input", "FP64", [1, 64], bytes(512)),
    "wrong rank": ("mlp", "input", "FP32", [64], bytes(256)),
    "wrong dim": ("mlp", "input", "FP32", [1, 63], bytes(252)),
    "short contents": ("mlp", "input", "FP32", [1, 64], bytes(255)),
    "bad BYTES": ("echo_bytes", "text", "BYTES", [1], struct.pack("<I", 9) + b"abc"),
    "batch too big": ("mlp", "input", "FP32", [65, 64], bytes(65 * 256)),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_bad_inputs_get_the_same_code_and_message_as_the_native_api(
    triton: TritonClientProcess, oip_server: ServerProcess, case: str
):
    model, name, datatype, shape, contents = PARITY_CASES[case]
    tensor = {"name": name, "datatype": datatype, "shape": shape}
    oip_code, oip_message, _ = triton.run(
        triton_raw_infer, oip_server.target, model, [tensor], [contents]
    )
    native = predict_request(model, {})
    native.inputs.add(name=name, datatype=datatype, shape=shape, contents=contents)
    with grpc.insecure_channel(oip_server.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            predict_pb2_grpc.PredictStub(channel).Predict(native, timeout=30)
    assert oip_code == raised.value.code().name, (case, oip_message)
    assert oip_code in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert oip_message == raised.value.details()
