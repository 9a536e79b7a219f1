"""Helpers shared by the integration tests: `inferd serve` subprocesses, demo inputs, and
in-process ONNX Runtime as the reference for served outputs.

A server subprocess is the harness's `start_inferd` (inferd.loadtest.server_process): `python
-m inferd.cli serve --model-repository DIR --port 0 --metrics-port 0`, its ports read from its
log, up once grpc.health.v1 says SERVING. Here it runs on the CPU, in a directory of its own.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

# The tests' names for the harness's server pieces (ServerProcess: an `inferd serve` process).
from inferd.loadtest.server_process import InferdProcess as ServerProcess
from inferd.loadtest.server_process import free_port as free_port
from inferd.loadtest.server_process import server_env as server_env
from inferd.loadtest.server_process import start_inferd
from inferd_wire.codec import to_wire
from inferd_wire.proto.inferd.v1 import predict_pb2, tensor_pb2

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Servers run their models on the CPU, even on a host with a usable GPU: the reference outputs
# come from ONNX Runtime's CPU kernels, and the queue tests size their load for CPU speed.
SERVER_DEFAULTS = {"INFERD_MODELS__EXECUTION_PROVIDERS": '["cpu"]'}


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
        server = start_inferd(
            repository,
            workdir / "server.log",
            env={**SERVER_DEFAULTS, **(env or {})},
            extra_args=extra_args,
        )
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


# --- figures for the end-of-run summary ---------------------------------------------------------

SUMMARY_KEY = pytest.StashKey[list[str]]()


def add_summary_line(config: pytest.Config, line: str) -> None:
    """A line for the end-of-run summary (shown even without -s)."""
    config.stash.setdefault(SUMMARY_KEY, []).append(line)


# A line a server must never log: a traceback, a record at ERROR or above (JSON logs), or an
# error from gRPC's C core (`E1201 09:12:40.670 ...`).
LOG_PROBLEM = re.compile(r'Traceback|"level": "(ERROR|CRITICAL)"|^E\d{4} \d\d:\d\d:\d\d')


class LogWatch:
    """What a server logs from now on."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.start = len(server.log_text())

    def problems(self) -> list[str]:
        text = self.server.log_text()[self.start :]
        return [line for line in text.splitlines() if LOG_PROBLEM.search(line)]

    def assert_clean(self) -> None:
        problems = self.problems()
        shown = "\n".join(line[:600] for line in problems[:8])
        assert not problems, f"the server logged {len(problems)} problem lines:\n{shown}"


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], what: str, within: float = 30.0
) -> None:
    """Poll `check` (plain or awaitable) every 20 ms until true; TimeoutError naming `what`
    after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


class Callers:
    """`count` caller tasks, each running `_caller(i)` until `stop()`: the continuous load of
    the reload and restart tests. A subclass records what its callers see."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def _caller(self, i: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._caller(i)) for i in range(self.count)]

    async def stop(self, within: float = 30.0) -> None:
        self._stop.set()
        async with asyncio.timeout(within):
            await asyncio.gather(*self._tasks)

    def check_running(self) -> None:
        """Raise what a caller died of, if one did."""
        for task in self._tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
