"""Helpers shared by the integration tests: `inferd serve` subprocesses, demo inputs, and
in-process ONNX Runtime as the reference for served outputs.

A server subprocess is `python -m inferd.cli serve --model-repository DIR --port 0
--metrics-port 0`; its ports come from the log line "inferd serving N model(s) on
127.0.0.1:PORT (metrics on port M)", and it counts as up once grpc.health.v1 says SERVING.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferd_wire.codec import to_wire
from inferd_wire.proto.inferd.v1 import predict_pb2, tensor_pb2

STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
READY_LINE = re.compile(
    r"inferd serving (\d+) model\(s\) on ([\d.]+):(\d+) \(metrics on port (\d+|off)\)"
)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    """One `inferd serve` subprocess."""

    process: subprocess.Popen[bytes]
    log_path: Path
    repository: Path
    port: int = 0
    metrics_port: int = -1
    models: int = 0
    _log_file: object = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def describe(self) -> str:
        """A header and the log tail, for assertion messages."""
        rc = self.process.poll()
        state = "running" if rc is None else f"exited with {rc}"
        return f"--- server {self.target} ({state}), log {self.log_path}:\n{self.log_tail()}"

    def send_signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig`, wait up to `timeout` s (then kill); returns the exit code."""
        self.send_signal(sig)
        try:
            rc = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rc = self.process.wait()
        close = getattr(self._log_file, "close", None)
        if close is not None:
            close()
        return rc


# Servers run their models on the CPU, even on a host with a usable GPU: the reference outputs
# come from ONNX Runtime's CPU kernels, and the queue tests size their load for CPU speed.
SERVER_DEFAULTS = {"INFERD_MODELS__EXECUTION_PROVIDERS": '["cpu"]'}


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess: ours without INFERD_*, plus `env`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


def wait_serving(target: str, timeout: float = 30.0) -> None:
    """Poll grpc.health.v1 Check("") until SERVING."""
    deadline = time.monotonic() + timeout
    last: object = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = response.status
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.1)
    raise TimeoutError(f"{target} not SERVING after {timeout} s (last: {last})")


def launch_server(
    repository: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> ServerProcess:
    """Start `python -m inferd.cli serve` on free ports; return once health says SERVING."""
    log_file = open(log_path, "wb")
    command = [
        sys.executable,
        "-m",
        "inferd.cli",
        "serve",
        "--model-repository",
        str(repository),
        "--port",
        "0",
        "--metrics-port",
        "0",
        *extra_args,
    ]
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=server_env({**SERVER_DEFAULTS, **(env or {})}),
        cwd=log_path.parent,
    )
    server = ServerProcess(process, log_path, Path(repository), _log_file=log_file)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            match = READY_LINE.search(server.log_text())
            if match:
                server.models = int(match.group(1))
                server.port = int(match.group(3))
                server.metrics_port = -1 if match.group(4) == "off" else int(match.group(4))
                break
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no 'inferd serving' line after {STARTUP_TIMEOUT} s")
            time.sleep(0.05)
        wait_serving(server.target)
    except BaseException as exc:
        server.stop(signal.SIGKILL, timeout=10)
        raise RuntimeError(f"{exc}\n{server.describe()}") from exc
    return server


class ServerFactory:
    """Starts servers in a directory of its own and stops them all at `close`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[ServerProcess] = []

    def __call__(
        self,
        repository: Path,
        env: Mapping[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> ServerProcess:
        workdir = self.root / f"server{len(self.servers)}"
        workdir.mkdir(parents=True, exist_ok=True)
        server = launch_server(repository, workdir / "server.log", env, extra_args)
        self.servers.append(server)
        return server

    def close(self) -> list[tuple[ServerProcess, int]]:
        """SIGTERM every server still running (and reap those that exited); (server, exit
        code) for each that did not exit 0."""
        failed = []
        for server in self.servers:
            rc = server.stop()
            if rc != 0:
                failed.append((server, rc))
        return failed


# --- in-process ONNX Runtime, the reference for served outputs --------------------------------

_SESSIONS: dict[Path, ort.InferenceSession] = {}


def reference_session(model_path: Path) -> ort.InferenceSession:
    """An in-process CPU session on the very model file the server loaded."""
    key = Path(model_path).resolve()
    if key not in _SESSIONS:
        _SESSIONS[key] = ort.InferenceSession(str(key), providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def reference_outputs(
    model_path: Path, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None
) -> dict[str, np.ndarray]:
    session = reference_session(model_path)
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(inputs)), strict=True))


def model_file(repository: Path, name: str, version: int = 1) -> Path:
    return Path(repository) / name / str(version) / "model.onnx"


# Float outputs: see test_outputs_match_onnxruntime.py for why this tolerance.
RTOL = 1e-5
ATOL = 1e-6


def assert_outputs_match(
    served: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], context: str = ""
) -> None:
    """Same output names, shapes and dtypes; floats within RTOL/ATOL, everything else exact.
    BYTES come back as bytes, ONNX Runtime's strings are str: compared as UTF-8."""
    assert sorted(served) == sorted(expected), f"{context}: output names differ"
    for name, want in expected.items():
        got = served[name]
        assert got.shape == want.shape, f"{context}: '{name}' shape {got.shape} != {want.shape}"
        if want.dtype.kind == "O":
            want_bytes = [w.encode("utf-8") if isinstance(w, str) else w for w in want.ravel()]
            assert list(got.ravel()) == want_bytes, f"{context}: '{name}' differs"
        elif want.dtype.kind == "f":
            assert got.dtype == want.dtype, f"{context}: '{name}' dtype {got.dtype}"
            np.testing.assert_allclose(
                got, want, rtol=RTOL, atol=ATOL, err_msg=f"{context}: '{name}'"
            )
        else:
            assert got.dtype == want.dtype, f"{context}: '{name}' dtype {got.dtype}"
            np.testing.assert_array_equal(got, want, err_msg=f"{context}: '{name}'")


# --- demo inputs -------------------------------------------------------------------------------


def mlp_input(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"input": rng.standard_normal((rows, 64)).astype(np.float32)}


def cnn_input(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"image": rng.standard_normal((rows, 3, 64, 64)).astype(np.float32)}


def text_input(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    mask = (rng.random((rows, length)) < 0.8).astype(np.int64)
    mask[:, 0] = 1
    return {
        "input_ids": rng.integers(0, 1000, (rows, length), dtype=np.int64),
        "attention_mask": mask,
    }


def echo_input(texts: list[str]) -> dict[str, np.ndarray]:
    return {"text": np.array(texts, dtype=object)}


# --- raw messages, for what the client library cannot express ----------------------------------


def raw_tensor(
    name: str, datatype: str, shape: list[int], contents: bytes = b""
) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=name, datatype=datatype, shape=shape, contents=contents)


def predict_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    version: int | None = None,
    **fields: object,
) -> predict_pb2.PredictRequest:
    """A PredictRequest of well-formed tensors; `fields` sets the others (timeout_us, id...)."""
    tensors = []
    for name, array in inputs.items():
        datatype, shape, contents = to_wire(np.asarray(array))
        tensors.append(raw_tensor(name, datatype, shape, contents))
    request = predict_pb2.PredictRequest(model=model, inputs=tensors, **fields)
    if version is not None:
        request.version = version
    return request


def fp32_tensor(name: str, shape: list[int]) -> tensor_pb2.Tensor:
    """An FP32 tensor whose contents match its shape exactly (zeros)."""
    count = int(np.prod(shape)) if shape else 1
    return raw_tensor(name, "FP32", shape, bytes(4 * count))


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- figures for the end-of-run summary ---------------------------------------------------------

SUMMARY_KEY = pytest.StashKey[list[str]]()


def add_summary_line(config: pytest.Config, line: str) -> None:
    """A line for the end-of-run summary (shown even without -s)."""
    config.stash.setdefault(SUMMARY_KEY, []).append(line)
