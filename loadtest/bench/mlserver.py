"""Seldon MLServer as a peer: MLServer 1.7.1 with a small onnxruntime runtime (written here) and
its adaptive batching set to inferd's batching settings (max_batch_size, max_batch_time =
the queue delay). MLServer has no ONNX runtime of its own; the custom runtime is the documented
way to serve one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from inferd.loadtest.bench.repository import Batching
from inferd.loadtest.bench.venvs import ensure_venv, onnxruntime_requirement
from inferd.loadtest.server_process import ServerProcess, free_port
from inferd.loadtest.targets.inprocess import ORT_DATATYPES, create_session

MLSERVER = "mlserver==1.7.1"
# uvloop 0.22 broke MLServer 1.7.1's inference workers ("There is no current event loop";
# SeldonIO/MLServer#2286, no fixed release yet).
UVLOOP = "uvloop<0.22"

RUNTIME_PY = '''\
"""MLServer runtime: onnxruntime on one ONNX file (written by inferd.loadtest.bench)."""

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 0
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(self._outputs, results)],
        )
'''


def model_settings(name: str, model_file: Path, batching: Batching) -> dict[str, object]:
    session = create_session(model_file)

    def tensors(items: list[object]) -> list[dict[str, object]]:
        return [
            {
                "name": t.name,  # type: ignore[attr-defined]
                "datatype": ORT_DATATYPES[t.type],  # type: ignore[attr-defined]
                "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in t.shape],  # type: ignore[attr-defined]
            }
            for t in items
        ]

    settings: dict[str, object] = {
        "name": name,
        "implementation": "onnx_runtime.OnnxRuntimeModel",
        "parameters": {"uri": "./model.onnx", "version": "1"},
        "inputs": tensors(list(session.get_inputs())),
        "outputs": tensors(list(session.get_outputs())),
    }
    if batching.max_batch_size > 1:
        settings["max_batch_size"] = batching.max_batch_size
        settings["max_batch_time"] = batching.max_queue_delay_us / 1e6
    return settings


def start_mlserver(
    workdir: Path,
    name: str,
    model_file: Path,
    batching: Batching,
    parallel_workers: int = 0,
    startup_s: float = 120.0,
) -> ServerProcess:
    """Set up and start `mlserver start`; PeerUnavailable if it cannot run here.

    `parallel_workers` 0 runs inference in the server process; MLServer's default (1) sends
    every batch to a worker process, which on this 2-core machine cost more than it saved."""
    venv = ensure_venv("mlserver", [MLSERVER, UVLOOP, onnxruntime_requirement(), "numpy"])
    root = workdir / "mlserver"
    shutil.rmtree(root, ignore_errors=True)
    model_dir = root / name
    model_dir.mkdir(parents=True)
    shutil.copy(model_file, model_dir / "model.onnx")
    (model_dir / "onnx_runtime.py").write_text(RUNTIME_PY)
    (model_dir / "model-settings.json").write_text(
        json.dumps(model_settings(name, model_file, batching), indent=2)
    )
    grpc_port = free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "debug": False,
                "host": "127.0.0.1",
                "http_port": free_port(),
                "grpc_port": grpc_port,
                "metrics_port": free_port(),
                "metrics_endpoint": None,
                "load_models_at_startup": True,
                "parallel_workers": parallel_workers,
            },
            indent=2,
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSERVER_", "INFERD_"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["PYTHONUNBUFFERED"] = "1"
    server = ServerProcess(
        "mlserver",
        [str(venv / "bin" / "mlserver"), "start", str(root)],
        workdir / "mlserver.log",
        env=env,
        cwd=root,
        port=grpc_port,
    )

    def ready() -> bool:
        text = server.log_text()
        return "gRPC server running" in text and f"Loaded model '{name}'" in text

    server.wait_until(ready, startup_s, "gRPC server with the model loaded")
    return server
