"""The framework ceiling: a grpc.aio server that answers inferd's two inference RPCs without
inferring, so its request rate is what this Python, this grpc and this event loop allow.

    python -m inferd.loadtest.bench.ceiling --port P [--model-repository DIR]

It serves `inferd.v1.Predict/Predict` and `inference.GRPCInferenceService/ModelInfer` (plus the
metadata RPCs the harness asks before a run, and grpc.health.v1). Per request it lets gRPC parse
the message, reads each input's bytes once, and returns a reply stored per (model, input
shapes): the model's outputs, named, typed and shaped as inferd would answer them (batch dim
from the request, other variable dims bound by name to the request's input dims, else 1),
filled with zeros. Nothing else: no validation, no batching, no statistics, no tracing.

To be a fair ceiling it runs as inferd runs: the same interpreter and grpc, the default asyncio
event loop, the generated servicer registration (so gRPC serialises the reply as it does
inferd's), and inferd's own server options (`inferd.app.channel_options`, message size limits).
Models are read from the repository the way inferd derives their signature (config.toml and
the ONNX graph), so the metadata matches inferd's.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from inferd.app import channel_options
from inferd.config import ServerConfig
from inferd.core.models.config import EffectiveConfig, ModelDefaults, load_model_config
from inferd.core.models.signature import GraphTensor, derive_signature
from inferd.core.types import ModelSignature, TensorSpec
from inferd.loadtest.targets.inprocess import create_session
from inferd_wire.codec import DTYPES, element_count
from inferd_wire.proto.inferd.v1 import (
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    tensor_pb2,
)
from inferd_wire.proto.inference import grpc_service_pb2 as oip
from inferd_wire.proto.inference import grpc_service_pb2_grpc as oip_grpc

SERVER_NAME = "inferd-ceiling"
READY_MESSAGE = "inferd-ceiling serving {models} model(s) on {host}:{port}"
# (input name, *shape) per input, in request order: what a stored reply is kept under.
ShapeKey = tuple[tuple[Any, ...], ...]


@dataclass
class CeilingModel:
    """One model's signature and its replies, built on first use of each input shape."""

    name: str
    version: int
    signature: ModelSignature
    _native: dict[ShapeKey, predict_pb2.PredictResponse] = field(default_factory=dict)
    _oip: dict[ShapeKey, oip.ModelInferResponse] = field(default_factory=dict)

    def output_shapes(self, inputs: Mapping[str, Sequence[int]]) -> list[tuple[int, ...]]:
        """Each output's shape for a request with these input shapes."""
        batches = self.signature.batches
        batch = next((int(s[0]) for s in inputs.values() if len(s)), 1)
        bound: dict[str, int] = {}
        for spec in self.signature.inputs:
            shape = inputs.get(spec.name)
            if shape is None:
                continue
            given = list(shape)[1:] if batches else list(shape)
            for name, size in zip(spec.dim_names, given, strict=False):
                if name is not None:
                    bound.setdefault(name, int(size))
        head: tuple[int, ...] = (batch,) if batches else ()
        shapes = []
        for spec in self.signature.outputs:
            names = spec.dim_names or (None,) * len(spec.dims)
            dims = tuple(
                d if d >= 0 else bound.get(n, 1) if n else 1
                for d, n in zip(spec.dims, names, strict=False)
            )
            shapes.append(head + dims)
        return shapes

    def _outputs(self, key: ShapeKey) -> list[tuple[TensorSpec, tuple[int, ...], bytes]]:
        shapes = self.output_shapes({name: shape for name, *shape in key})
        return [
            (spec, shape, zero_contents(spec.datatype, shape))
            for spec, shape in zip(self.signature.outputs, shapes, strict=True)
        ]

    def native_reply(self, key: ShapeKey) -> predict_pb2.PredictResponse:
        reply = self._native.get(key)
        if reply is None:
            reply = self._native[key] = predict_pb2.PredictResponse(
                model=self.name,
                version=self.version,
                outputs=[
                    tensor_pb2.Tensor(
                        name=spec.name, datatype=spec.datatype, shape=shape, contents=contents
                    )
                    for spec, shape, contents in self._outputs(key)
                ],
            )
        return reply

    def oip_reply(self, key: ShapeKey) -> oip.ModelInferResponse:
        reply = self._oip.get(key)
        if reply is None:
            outputs = self._outputs(key)
            reply = self._oip[key] = oip.ModelInferResponse(
                model_name=self.name,
                model_version=str(self.version),
                outputs=[
                    oip.ModelInferResponse.InferOutputTensor(
                        name=spec.name, datatype=spec.datatype, shape=shape
                    )
                    for spec, shape, _ in outputs
                ],
                raw_output_contents=[contents for *_, contents in outputs],
            )
        return reply


def zero_contents(datatype: str, shape: Sequence[int]) -> bytes:
    """Zeros in the wire layout; BYTES elements are empty (a 4-byte zero length each)."""
    count = element_count(shape)
    itemsize = 4 if datatype == "BYTES" else DTYPES[datatype].itemsize
    return bytes(count * itemsize)


def load_models(repository: Path) -> dict[str, CeilingModel]:
    """The newest numeric version of every `<model>/<version>/model.onnx`, signed as inferd
    signs it (config.toml over the graph, the server's default model settings)."""
    models: dict[str, CeilingModel] = {}
    for model_dir in sorted(p for p in Path(repository).iterdir() if p.is_dir()):
        versions = sorted(
            (int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), reverse=True
        )
        version = next((v for v in versions if (model_dir / str(v) / "model.onnx").is_file()), 0)
        if not version:
            continue
        session = create_session(model_dir / str(version) / "model.onnx")

        def graph(tensors: Sequence[Any]) -> list[GraphTensor]:
            return [GraphTensor(t.name, t.type, tuple(t.shape)) for t in tensors]

        signature = derive_signature(
            graph(session.get_inputs()),
            graph(session.get_outputs()),
            EffectiveConfig.merge(load_model_config(model_dir / "config.toml"), ModelDefaults()),
        )
        models[model_dir.name] = CeilingModel(model_dir.name, version, signature)
    return models


def _tensor_metadata(signature: ModelSignature, specs: Sequence[TensorSpec], cls: Any) -> list[Any]:
    return [cls(name=s.name, datatype=s.datatype, shape=signature.full_shape(s)) for s in specs]


class CeilingPredict(predict_pb2_grpc.PredictServicer):
    def __init__(self, models: Mapping[str, CeilingModel]) -> None:
        self._models = models

    async def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> predict_pb2.PredictResponse:
        try:
            model = self._models[request.model]
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model}' not found")
            raise
        key = []
        for tensor in request.inputs:
            tensor.contents  # noqa: B018 - read each input's bytes once, as a server must
            key.append((tensor.name, *tensor.shape))
        reply = model.native_reply(tuple(key))
        if request.id:
            reply = predict_pb2.PredictResponse(
                model=reply.model, version=reply.version, id=request.id, outputs=reply.outputs
            )
        return reply


class CeilingModelStatus(model_status_pb2_grpc.ModelStatusServicer):
    """GetModelMetadata only: what the harness's native target asks before a run."""

    def __init__(self, models: Mapping[str, CeilingModel]) -> None:
        self._models = models

    async def GetModelMetadata(
        self, request: model_status_pb2.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> model_status_pb2.ModelMetadata:
        try:
            model = self._models[request.model]
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.model}' not found")
            raise
        signature = model.signature
        return model_status_pb2.ModelMetadata(
            name=model.name,
            version=model.version,
            versions=[model.version],
            platform="none (inferd-ceiling)",
            inputs=_tensor_metadata(signature, signature.inputs, tensor_pb2.TensorMetadata),
            outputs=_tensor_metadata(signature, signature.outputs, tensor_pb2.TensorMetadata),
            max_batch_size=signature.max_batch_size,
        )


class CeilingInference(oip_grpc.GRPCInferenceServiceServicer):
    """ModelInfer, and the metadata and liveness RPCs OIP clients ask first."""

    def __init__(self, models: Mapping[str, CeilingModel]) -> None:
        self._models = models

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        try:
            model = self._models[request.model_name]
        except KeyError:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model '{request.model_name}' not found"
            )
            raise
        request.raw_input_contents[:]  # read each input's bytes once, as a server must
        reply = model.oip_reply(tuple((t.name, *t.shape) for t in request.inputs))
        if request.id:
            reply = oip.ModelInferResponse(
                model_name=reply.model_name,
                model_version=reply.model_version,
                id=request.id,
                outputs=reply.outputs,
                raw_output_contents=reply.raw_output_contents,
            )
        return reply

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        try:
            model = self._models[request.name]
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' not found")
            raise
        signature = model.signature
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[str(model.version)],
            platform="none (inferd-ceiling)",
            inputs=_tensor_metadata(signature, signature.inputs, tensor),
            outputs=_tensor_metadata(signature, signature.outputs, tensor),
        )

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=_version())

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=request.name in self._models)


def _version() -> str:
    try:
        return metadata.version("inferd")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class CeilingServer:
    server: grpc.aio.Server
    port: int
    models: dict[str, CeilingModel]

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)


async def start_ceiling_server(
    repository: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_bytes: int | None = None,
) -> CeilingServer:
    """Listening and SERVING on return; `port` 0 picks a free one (see `.port`)."""
    models = load_models(repository)
    limit = max_message_bytes or ServerConfig.model_fields["max_message_bytes"].default
    server = grpc.aio.server(options=channel_options(limit))
    # The generated registrations, as inferd's (server/inferd/app.py): the same (de)serialisers.
    predict_pb2_grpc.add_PredictServicer_to_server(CeilingPredict(models), server)  # type: ignore[no-untyped-call]
    model_status_pb2_grpc.add_ModelStatusServicer_to_server(CeilingModelStatus(models), server)  # type: ignore[no-untyped-call]
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(CeilingInference(models), server)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    return CeilingServer(server, bound, models)


async def serve(repository: Path, host: str, port: int, max_message_bytes: int | None) -> None:
    """Until SIGTERM or SIGINT."""
    ceiling = await start_ceiling_server(repository, host, port, max_message_bytes)
    print(READY_MESSAGE.format(models=len(ceiling.models), host=host, port=ceiling.port))
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ceiling.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inferd.loadtest.bench.ceiling",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument(
        "--max-message-bytes", type=int, default=None, help="default: inferd's default"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.model_repository, args.host, args.port, args.max_message_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
