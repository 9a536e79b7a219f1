"""The Open Inference Protocol frontend driven by Triton's own Python client, `tritonclient`
(grpc and grpc.aio), against a real `inferd serve` subprocess.

tritonclient runs in a separate process (`TritonClientProcess`): its generated code registers
package `inference` in protobuf's default descriptor pool from files named differently from
ours, and one process can hold only one of the two, so the test process, which may load
inferd's (`gen/inference`), never imports tritonclient. The functions named `triton_*` run in
that process; they import tritonclient themselves and return plain values.
"""

from __future__ import annotations

import ast
import asyncio
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
import pytest
from integration_support import (
    ServerFactory,
    ServerProcess,
    assert_outputs_match,
    echo_input,
    mlp_input,
    model_file,
    reference_outputs,
    text_input,
)
from onnx import TensorProto, helper

from inferd.demo_models import IR_VERSION, OPSET, build_demo_repository, build_mlp, write_model

T = TypeVar("T")
CLIENT_TIMEOUT = 60.0


class TritonClientProcess:
    """A spawned process that imports tritonclient; `run(f, *args)` calls f there."""

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool

    def run(self, function: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(function, *args).result(timeout=CLIENT_TIMEOUT)


@pytest.fixture(scope="module")
def triton() -> Iterator[TritonClientProcess]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        yield TritonClientProcess(pool)
    assert "tritonclient" not in sys.modules, "tritonclient was imported into the test process"


def build_fp16_add() -> onnx.ModelProto:
    """`x` FP16 [batch, 4] -> x + x -> `y` FP16 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"], name="double")],
        "fp16_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def oip_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("oip_repository")
    build_demo_repository(repo)
    write_model(build_fp16_add(), repo, "fp16_add")
    write_model(
        build_mlp(),
        repo,
        "mlp_slow",
        config_toml="max_batch_size = 8\nmax_queue_delay_us = 5000000\n",
    )
    return repo


@pytest.fixture(scope="module")
def oip_server(module_server_factory: ServerFactory, oip_repository: Path) -> ServerProcess:
    return module_server_factory(oip_repository)


# --- run in the tritonclient process -----------------------------------------------------------


def _client(target: str) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(target)


def _inputs(arrays: dict[str, np.ndarray]) -> list[Any]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _error(exc: Exception) -> tuple[str, str]:
    status = getattr(exc, "status", lambda: None)()
    message = getattr(exc, "message", lambda: str(exc))()
    return str(status).removeprefix("StatusCode."), message


def triton_health(target: str) -> dict[str, bool]:
    c = _client(target)
    return {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "mlp": c.is_model_ready("mlp"),
        "mlp v1": c.is_model_ready("mlp", "1"),
        "mlp v9": c.is_model_ready("mlp", "9"),
        "unknown": c.is_model_ready("no_such_model"),
    }


def triton_json(target: str, call: str, *args: Any) -> Any:
    """A tritonclient call answered as JSON (get_server_metadata, get_model_config, ...)."""
    return getattr(_client(target), call)(*args, as_json=True)


def _outputs(result: Any) -> dict[str, np.ndarray]:
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def triton_infer(
    target: str,
    model: str,
    arrays: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, np.ndarray] | tuple[str, str]:
    """InferenceServerClient.infer; `options` are its keyword arguments (timeout, priority,
    model_version). An error comes back as (code, message)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    try:
        result = _client(target).infer(model, _inputs(arrays), outputs=requested, **(options or {}))
    except InferenceServerException as exc:
        return _error(exc)
    return _outputs(result)


def triton_async_infer(target: str, model: str, arrays: dict[str, np.ndarray]) -> Any:
    """tritonclient.grpc's callback-based async_infer."""
    import queue

    answers: queue.Queue[Any] = queue.Queue()
    client = _client(target)
    client.async_infer(model, _inputs(arrays), lambda result, error: answers.put((result, error)))
    result, error = answers.get(timeout=30)
    assert error is None, error
    return _outputs(result)


def triton_aio_infer(target: str, model: str, arrays: dict[str, np.ndarray]) -> Any:
    """tritonclient.grpc.aio: several requests at once on one channel."""
    import tritonclient.grpc.aio as aioclient

    async def run() -> list[dict[str, np.ndarray]]:
        async with aioclient.InferenceServerClient(target) as client:
            results = await asyncio.gather(
                *(client.infer(model, _inputs(arrays), request_id=str(i)) for i in range(4))
            )
        return [_outputs(result) for result in results]

    return asyncio.run(run())


def triton_stream(target: str, requests: list[tuple[str, str, dict[str, np.ndarray]]]) -> Any:
    """Each (id, model, inputs) on one stream; returns ({id: outputs}, [error messages])."""
    import queue

    answers: queue.Queue[Any] = queue.Queue()
    client = _client(target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for request_id, model, arrays in requests:
        client.async_stream_infer(model, _inputs(arrays), request_id=request_id)
    ok: dict[str, dict[str, np.ndarray]] = {}
    errors: list[str] = []
    for _ in requests:
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(error.message())
        else:
            ok[result.get_response().id] = _outputs(result)
    client.stop_stream()
    return ok, errors


def triton_raw_infer(
    target: str, model: str, tensors: list[dict[str, Any]], raw: list[bytes] | None = None
) -> Any:
    """A ModelInferRequest the client library would not build (typed contents, malformed
    tensors), made and sent with Triton's own generated code. `tensors`: name, datatype, shape
    and optionally contents ({field: values}). Returns (code, message, {output name:
    (datatype, shape, raw bytes)})."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model, id="req-1")
    for spec in tensors:
        tensor = request.inputs.add(
            name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
        )
        for field, values in spec.get("contents", {}).items():
            getattr(tensor.contents, field).extend(values)
    request.raw_input_contents.extend(raw or [])
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            response = stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details(), {}
    outputs = {
        o.name: (o.datatype, list(o.shape), raw)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return "OK", "", outputs


def triton_unavailable_calls(target: str) -> dict[str, tuple[str, str]]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = _client(target)
    shared_input = grpcclient.InferInput("input", [1, 64], "FP32")
    shared_input.set_shared_memory("region", 256)
    (plain_input,) = _inputs({"input": np.ones((1, 64), np.float32)})
    classification = grpcclient.InferRequestedOutput("probabilities", class_count=3)
    calls = {
        "load_model": lambda: client.load_model("mlp"),
        "unload_model": lambda: client.unload_model("mlp"),
        "repository_index": client.get_model_repository_index,
        "system_shared_memory": client.get_system_shared_memory_status,
        "register_system_shared_memory": lambda: client.register_system_shared_memory(
            "region", "/key", 64
        ),
        "cuda_shared_memory": client.get_cuda_shared_memory_status,
        "trace_settings": client.get_trace_settings,
        "log_settings": client.get_log_settings,
        "shared_memory_input": lambda: client.infer("mlp", [shared_input]),
        "classification": lambda: client.infer("mlp", [plain_input], outputs=[classification]),
        "string timeout": lambda: client.infer("mlp", [plain_input], parameters={"timeout": "1s"}),
    }
    answers = {}
    for name, call in calls.items():
        try:
            call()
            answers[name] = ("OK", "")
        except InferenceServerException as exc:
            answers[name] = _error(exc)
    return answers


# --- the wire contract --------------------------------------------------------------------------


def _tritonclient_file_descriptor(module: str) -> Any:
    """The FileDescriptorProto embedded in one of tritonclient's generated modules, read from
    its source (importing it here would clash with ours, see the module docstring)."""
    import importlib.util

    from google.protobuf import descriptor_pb2

    # find_spec on tritonclient.grpc.* would import tritonclient.grpc itself.
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "grpc" / f"{module}.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
    raise AssertionError(f"no serialized descriptor in {path}")


def _definitions(file: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def message(prefix: str, m: Any) -> None:
        name = f"{prefix}.{m.name}"
        out[name] = {
            f.name: (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1]) for f in m.field
        }
        for nested in m.nested_type:
            message(name, nested)
        for e in m.enum_type:
            out[f"{name}.{e.name}"] = {v.name: v.number for v in e.value}

    for m in file.message_type:
        message(file.package, m)
    for e in file.enum_type:
        out[f"{file.package}.{e.name}"] = {v.name: v.number for v in e.value}
    for s in file.service:
        out[s.name] = {m.name: (m.input_type, m.output_type, m.client_streaming) for m in s.method}
    return out


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [("grpc_service_pb2", "service_pb2"), ("model_config_pb2", "model_config_pb2")],
)
def test_protos_match_tritonclients_definitions_field_for_field(ours: str, theirs: str):
    """Everything tritonclient (Triton 23.12) defines exists in ours with the same name, number
    and type; ours may only add what later Triton releases added."""
    import importlib

    from google.protobuf import descriptor_pb2

    mine = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(f"inferd_wire.proto.inference.{ours}").DESCRIPTOR.CopyToProto(mine)
    ours_defs, theirs_defs = _definitions(mine), _definitions(_tritonclient_file_descriptor(theirs))
    assert mine.package == "inference"
    for name, fields in theirs_defs.items():
        assert name in ours_defs, f"{name} is missing"
        for field, spec in fields.items():
            assert ours_defs[name].get(field) == spec, f"{name}.{field}: {spec} expected"


# --- health, metadata, configuration ----------------------------------------------------------


def test_health_and_model_readiness(triton: TritonClientProcess, oip_server: ServerProcess):
    assert triton.run(triton_health, oip_server.target) == {
        "live": True,
        "ready": True,
        "mlp": True,
        "mlp v1": True,
        "mlp v9": False,
        "unknown": False,
    }


def test_grpc_health_answers_for_the_service(oip_server: ServerProcess):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(oip_server.target) as channel:
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        response = health_pb2_grpc.HealthStub(channel).Check(check, timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_server_metadata_lists_only_implemented_extensions(
    triton: TritonClientProcess, oip_server: ServerProcess
):
    meta = triton.run(triton_json, oip_server.target, "get_server_metadata")
    assert meta["name"] == "inferd"
    assert meta["version"]
    assert sorted(meta["extensions"]) == [
        "model_configuration",
        "model_repository",
        "schedule_policy",
        "statistics",
    ]


def test_model_metadata_has_a_variable_batch_dim(
    triton: TritonClientProcess, oip_server: ServerProcess
):
    meta = triton.run(triton_json, oip_server.target, "get_model_metadata", "text_encoder")
    assert meta["name"] == "text_encoder"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": "input_ids", "datatype": "INT64", "shape": ["-1", "-1"]},
        {"name": "attention_mask", "datatype": "INT64", "shape": ["-1", "-1"]},
    ]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "128"]}]


def test_model_config_reports_what_the_model_runs_with(
    triton: TritonClientProcess, oip_server: ServerProcess
):
    config = triton.run(triton_json, oip_server.target, "get_model_config", "mlp")["config"]
    assert config["name"] == "mlp"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["64"]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["10"]}]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == "200"
    assert batching["default_queue_policy"]["max_queue_size"] == 1024
    assert config["instance_group"] == [{"name": "mlp", "kind": "KIND_CPU", "count": 1}]
    echo = triton.run(triton_json, oip_server.target, "get_model_config", "echo_bytes")["config"]
    assert echo["input"][0]["data_type"] == "TYPE_STRING"


def test_unimplemented_features_say_so(triton: TritonClientProcess, oip_server: ServerProcess):
    answers = triton.run(triton_unavailable_calls, oip_server.target)
    for name in ("load_model", "unload_model", "repository_index"):
        # The server under test sets no control token: the control plane is off (the index
        # with a token: test_oip_triton_repository.py, test_control_plane.py).
        code, message = answers[name]
        assert code == "FAILED_PRECONDITION", answers[name]
        assert "control RPCs are disabled" in message
    for name in ("system_shared_memory", "register_system_shared_memory", "cuda_shared_memory"):
        code, message = answers[name]
        assert code == "UNIMPLEMENTED", answers[name]
        assert "shared-memory extension is not implemented" in message
    for name in ("trace_settings", "log_settings"):
        assert answers[name][0] == "UNIMPLEMENTED", answers[name]
        assert "not implemented by inferd" in answers[name][1]
    code, message = answers["shared_memory_input"]
    assert code == "UNIMPLEMENTED" and "input 'input' names a shared-memory region" in message
    code, message = answers["classification"]
    assert code == "UNIMPLEMENTED" and "classification extension" in message
    code, message = answers["string timeout"]
    assert code == "INVALID_ARGUMENT" and "parameter 'timeout' must be an integer" in message


# --- inference ---------------------------------------------------------------------------------


def _fp16_input(rows: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(rows * 4, dtype=np.float16).reshape(rows, 4) / 8}


def _cases() -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(4)
    return {
        "FP32": ("mlp", mlp_input(rng, 3)),
        "FP16": ("fp16_add", _fp16_input(2)),
        "INT64": ("text_encoder", text_input(rng, 2, 7)),
        "BYTES": ("echo_bytes", echo_input(["hello", "", "grüße"])),
    }


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "INT64", "BYTES"])
@pytest.mark.parametrize("call", [triton_infer, triton_async_infer])
def test_infer_matches_onnxruntime(
    triton: TritonClientProcess,
    oip_server: ServerProcess,
    oip_repository: Path,
    datatype: str,
    call: Callable[..., Any],
):
    model, inputs = _cases()[datatype]
    served = triton.run(call, oip_server.target, model, inputs)
    expected = reference_outputs(model_file(oip_repository, model), inputs)
    assert_outputs_match(served, expected, f"{model} via {call.__name__}")


def test_aio_client_concurrent_requests(
    triton: TritonClientProcess, oip_server: ServerProcess, oip_repository: Path
):
    model, inputs = _cases()["INT64"]
    expected = reference_outputs(model_file(oip_repository, model), inputs)
    for served in triton.run(triton_aio_infer, oip_server.target, model, inputs):
        assert_outputs_match(served, expected, "aio")


def test_requested_outputs_subset_and_unknown_output(
    triton: TritonClientProcess, oip_server: ServerProcess
):
    inputs = {"input": np.ones((1, 64), np.float32)}
    served = triton.run(triton_infer, oip_server.target, "mlp", inputs, ["probabilities"])
    assert list(served) == ["probabilities"]
    code, message = triton.run(triton_infer, oip_server.target, "mlp", inputs, ["logits"])
    assert code == "INVALID_ARGUMENT"
    assert "'logits'" in message


def test_timeout_parameter_ends_a_queued_request(
    triton: TritonClientProcess, oip_server: ServerProcess
):
    """mlp_slow waits up to 5 s for a batch to fill; a 50 ms `timeout` ends it first."""
    inputs = {"input": np.ones((1, 64), np.float32)}
    code, message = triton.run(
        triton_infer, oip_server.target, "mlp_slow", inputs, None, {"timeout": 50_000}
    )
    assert code == "DEADLINE_EXCEEDED", message


def test_priority_parameter_is_accepted(triton: TritonClientProcess, oip_server: ServerProcess):
    inputs = {"input": np.ones((2, 64), np.float32)}
    served = triton.run(triton_infer, oip_server.target, "mlp", inputs, None, {"priority": 1})
    assert served["probabilities"].shape == (2, 10)


def test_stream_answers_each_request_and_survives_a_bad_one(
    triton: TritonClientProcess, oip_server: ServerProcess, oip_repository: Path
):
    rng = np.random.default_rng(7)
    good = {str(i): mlp_input(rng, i + 1) for i in range(4)}
    bad = {"input": np.ones((1, 63), np.float32)}
    requests = [(i, "mlp", x) for i, x in list(good.items())[:2]]
    requests += [("bad", "mlp", bad)]
    requests += [(i, "mlp", x) for i, x in list(good.items())[2:]]
    ok, errors = triton.run(triton_stream, oip_server.target, requests)
    assert sorted(ok) == sorted(good)
    for request_id, inputs in good.items():
        expected = reference_outputs(model_file(oip_repository, "mlp"), inputs)
        assert_outputs_match(ok[request_id], expected, f"stream id {request_id}")
    assert len(errors) == 1 and "'input'" in errors[0] and "dim 1 is 63" in errors[0], errors


# --- typed contents and malformed requests, with Triton's generated stub --------------------


def test_unparsable_version_is_invalid_argument(
    triton: TritonClientProcess, oip_server: ServerProcess
):
    inputs = {"input": np.ones((1, 64), np.float32)}
    options = {"model_version": "latest"}
    code, message = triton.run(triton_infer, oip_server.target, "mlp", inputs, None, options)
    assert code == "INVALID_ARGUMENT"
    assert "model_version" in message and "'latest'" in message
