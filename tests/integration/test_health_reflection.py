"""The server's discovery surface: grpc.health.v1, server reflection, ModelStatus and the
Prometheus endpoint, on the shared server."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from integration_support import ServerProcess, mlp_input

from inferd_client import InferClient, ModelNotFoundError
from inferd_wire.proto.inferd.v1 import model_status_pb2, model_status_pb2_grpc

WAIT = 30.0
DEMO_MODELS = ["cnn", "echo_bytes", "mlp", "text_encoder"]
SERVICES = ["inferd.v1.Predict", "inferd.v1.ModelStatus"]


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


# --- health -----------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", *SERVICES])
def test_health_check_is_serving(channel, service: str):
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=WAIT
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_check_of_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inferd.v1.NoSuchService"), timeout=WAIT
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_first_reports_serving(channel):
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=WAIT
    )
    try:
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        call.cancel()


def test_client_health_helper(client: InferClient):
    assert client.health() == "SERVING"
    assert client.health("inferd.v1.Predict") == "SERVING"
    assert client.health("inferd.v1.NoSuchService") == "SERVICE_UNKNOWN"


# --- reflection -------------------------------------------------------------------------------


def _reflect(channel, **request) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=WAIT
        )
    )
    return response


def test_reflection_lists_the_services(channel):
    response = _reflect(channel, list_services="")
    names = {s.name for s in response.list_services_response.service}
    assert {
        *SERVICES,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names, names


def test_reflection_describes_predict(channel):
    response = _reflect(channel, file_containing_symbol="inferd.v1.Predict")
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = {}
    for raw in response.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    predict = files["inferd/v1/predict.proto"]
    assert predict.package == "inferd.v1"
    (service,) = [s for s in predict.service if s.name == "Predict"]
    methods = {m.name: m for m in service.method}
    assert set(methods) == {"Predict", "PredictStream"}
    assert methods["PredictStream"].client_streaming and methods["PredictStream"].server_streaming
    assert not methods["Predict"].client_streaming and not methods["Predict"].server_streaming


def test_reflection_describes_the_open_inference_protocol(channel):
    """Its messages live in inferd's own descriptor pool (beside tritonclient's), yet grpcurl
    and other reflection clients see them like any other service."""
    response = _reflect(channel, file_containing_symbol="inference.GRPCInferenceService")
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = {
        proto.name: proto
        for proto in map(
            descriptor_pb2.FileDescriptorProto.FromString,
            response.file_descriptor_response.file_descriptor_proto,
        )
    }
    service = files["inference/grpc_service.proto"]
    assert service.package == "inference"
    assert "inference/model_config.proto" in service.dependency
    (grpc_service,) = service.service
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata"} <= {
        m.name for m in grpc_service.method
    }


def test_reflection_describes_health(channel):
    response = _reflect(channel, file_containing_symbol="grpc.health.v1.Health")
    assert response.WhichOneof("message_response") == "file_descriptor_response", response


def test_reflection_of_unknown_symbol_is_not_found(channel):
    response = _reflect(channel, file_containing_symbol="inferd.v1.NoSuchThing")
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# --- ModelStatus ------------------------------------------------------------------------------


def test_list_models_has_the_demo_models_ready(client: InferClient):
    models = client.list_models(timeout=WAIT)
    assert sorted(models) == DEMO_MODELS
    for name, versions in models.items():
        assert [(v.version, v.state) for v in versions] == [(1, "READY")], (name, versions)


def test_metadata_of_text_encoder(client: InferClient):
    metadata = client.metadata("text_encoder", timeout=WAIT)
    assert metadata.name == "text_encoder" and metadata.version == 1
    assert metadata.versions == (1,)
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [
        ("input_ids", "INT64", (-1, -1)),
        ("attention_mask", "INT64", (-1, -1)),
    ]
    assert [(t.name, t.datatype, t.shape) for t in metadata.outputs] == [
        ("embedding", "FP32", (-1, 128))
    ]
    # No config.toml: the server default.
    assert metadata.max_batch_size == 32
    assert metadata.batching["max_batch_size"] == 32
    assert "CPUExecutionProvider" in metadata.execution_providers


def test_metadata_of_mlp_reflects_its_config(client: InferClient):
    metadata = client.metadata("mlp", timeout=WAIT)
    assert metadata.max_batch_size == 64
    assert metadata.batching["max_queue_delay_us"] == 200
    assert metadata.batching["max_queue_size"] == 1024
    assert [(t.name, t.datatype, t.shape) for t in metadata.inputs] == [("input", "FP32", (-1, 64))]


def test_status_of_unknown_model_is_not_found(client: InferClient):
    with pytest.raises(ModelNotFoundError):
        client.status("no_such_model", timeout=WAIT)
    with pytest.raises(ModelNotFoundError):
        client.metadata("no_such_model", timeout=WAIT)


def test_watch_first_yields_current_states(channel):
    stub = model_status_pb2_grpc.ModelStatusStub(channel)
    call = stub.WatchModelStatus(model_status_pb2.WatchModelStatusRequest(), timeout=WAIT)
    try:
        first = [next(call) for _ in DEMO_MODELS]
    finally:
        call.cancel()
    assert sorted((e.model, e.version) for e in first) == [(m, 1) for m in DEMO_MODELS]
    assert {e.state for e in first} == {model_status_pb2.MODEL_STATE_READY}


def test_watch_of_one_model(client: InferClient):
    events = client.watch("mlp")
    try:
        event = next(events)
    finally:
        events.close()
    assert (event.model, event.version, event.state) == ("mlp", 1, "READY")


def test_watch_of_unknown_model_is_not_found(client: InferClient):
    events = client.watch("no_such_model")
    with pytest.raises(ModelNotFoundError):
        next(events)


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_endpoint_counts_requests_and_batches(server: ServerProcess, client: InferClient):
    client.infer("mlp", mlp_input(np.random.default_rng(100), 2), timeout=WAIT)
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        assert response.status == 200
        text = response.read().decode()
    assert "inferd_requests_total" in text
    assert "inferd_batch_size_bucket" in text
    mlp_ok = [
        line
        for line in text.splitlines()
        if line.startswith("inferd_requests_total")
        and 'model="mlp"' in line
        and 'code="OK"' in line
    ]
    assert mlp_ok and float(mlp_ok[0].split()[-1]) >= 1, mlp_ok or text[:2000]
