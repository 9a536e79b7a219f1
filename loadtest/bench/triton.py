"""NVIDIA Triton as a peer: the real `tritonserver` binary that the `nvidia-pytriton` wheel ships,
with its Python backend. No ONNX Runtime backend is on PyPI, so the model is a Python-backend
`model.py` that concatenates each dynamic batch into one onnxruntime call on the same ONNX file
inferd serves, with the same batching settings (max batch size, queue delay, one instance).

Running the binary outside pytriton needs what pytriton arranges itself: the Python-backend
stub for our interpreter's version in the backend directory, and `LD_LIBRARY_PATH` holding the
interpreter's libpython directory and `nvidia_pytriton.libs`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from inferd.loadtest.bench.repository import Batching
from inferd.loadtest.bench.venvs import (
    PeerUnavailable,
    ensure_venv,
    onnxruntime_requirement,
    venv_python_value,
)
from inferd.loadtest.server_process import ServerProcess, free_port
from inferd.loadtest.targets.inprocess import create_session

PYTRITON = "nvidia-pytriton==0.7.0"
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}

MODEL_PY = '''\
"""Triton Python backend: one onnxruntime run per dynamic batch (written by
inferd.loadtest.bench)."""

import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 0
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        parts = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.inputs
        }
        sizes = [len(a) for a in parts[self.inputs[0]]]
        feeds = {n: a[0] if len(a) == 1 else np.concatenate(a) for n, a in parts.items()}
        results = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(n, r[start : start + size]) for n, r in zip(self.outputs, results)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
'''


def _dims(shape: list[object], batched: bool) -> str:
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    return ", ".join(str(d) for d in (dims[1:] if batched else dims))


def model_config(name: str, model_file: Path, batching: Batching) -> str:
    """config.pbtxt for a Python-backend model with the graph's tensors."""
    session = create_session(model_file)
    batched = batching.max_batch_size > 0

    def tensors(items: list[object]) -> str:
        return ",\n".join(
            f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.type]} '  # type: ignore[attr-defined]
            f"dims: [ {_dims(list(t.shape), batched)} ] }}"  # type: ignore[attr-defined]
            for t in items
        )

    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {batching.max_batch_size}",
        f"input [\n{tensors(list(session.get_inputs()))}\n]",
        f"output [\n{tensors(list(session.get_outputs()))}\n]",
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
    ]
    if batched:
        lines.append(
            f"dynamic_batching {{ max_queue_delay_microseconds: {batching.max_queue_delay_us} }}"
        )
    return "\n".join(lines) + "\n"


def start_triton(
    workdir: Path, name: str, model_file: Path, batching: Batching, startup_s: float = 120.0
) -> ServerProcess:
    """Set up (venv, binaries, repository) and start tritonserver; PeerUnavailable if it
    cannot run here."""
    venv = ensure_venv("triton", [PYTRITON, onnxruntime_requirement(), "numpy"])
    site = Path(venv_python_value(venv, "__import__('sysconfig').get_paths()['purelib']"))
    libdir = venv_python_value(venv, "__import__('sysconfig').get_config_var('LIBDIR')")
    version = venv_python_value(venv, "'%d.%d' % __import__('sys').version_info[:2]")
    dist = site / "pytriton" / "tritonserver"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not (dist / "bin" / "tritonserver").is_file():
        raise PeerUnavailable(f"{PYTRITON} installed no tritonserver binary under {dist}")
    if not stub.is_file():
        raise PeerUnavailable(f"{PYTRITON} ships no Python-backend stub for Python {version}")
    server_dir = workdir / "tritonserver"
    shutil.rmtree(server_dir, ignore_errors=True)
    shutil.copytree(dist, server_dir, ignore=shutil.ignore_patterns("python_backend_stubs"))
    shutil.copy(stub, server_dir / "backends" / "python" / "triton_python_backend_stub")

    repository = workdir / "repository"
    shutil.rmtree(repository, ignore_errors=True)
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    shutil.copy(model_file, version_dir / "model.onnx")
    (version_dir / "model.py").write_text(MODEL_PY)
    (repository / name / "config.pbtxt").write_text(model_config(name, model_file, batching))

    grpc_port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "LD_LIBRARY_PATH": f"{libdir}:{site / 'nvidia_pytriton.libs'}",
        "HOME": str(workdir),
    }
    server = ServerProcess(
        "tritonserver",
        [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            f"--backend-directory={server_dir / 'backends'}",
            f"--cache-directory={server_dir / 'caches'}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--log-verbose=0",
        ],
        workdir / "tritonserver.log",
        env=env,
        cwd=workdir,
        port=grpc_port,
    )
    server.wait_until(
        lambda: "Started GRPCInferenceService" in server.log_text(), startup_s, "GRPC service"
    )
    return server


def triton_version(server: ServerProcess) -> str:
    for line in server.log_text().splitlines():
        if "server_version" in line:
            return line.split("|")[-2].strip() if "|" in line else line.strip()
    return "unknown"
