"""Servers run as subprocesses on loopback, for the benchmark suite and the integration tests.

`ServerProcess` is any server (inferd, Triton, MLServer): started in a process group of its
own with its combined output in a log file, stopped with a signal (SIGTERM unless told), then
SIGKILL when it does not exit in time. `start_inferd` runs `python -m inferd.cli serve` on free
loopback ports and returns once the server's log names its ports and grpc.health.v1 answers
SERVING; a server that does not get there is killed and `ServerStartError` carries its log tail.
`start_ceiling` does the same for the framework ceiling (`inferd.loadtest.bench.ceiling`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
READY_LINE = re.compile(
    r"inferd serving (\d+) model\(s\) on ([\d.]+):(\d+) \(metrics on port (\d+|off)\)"
)
CEILING_READY_LINE = re.compile(r"inferd-ceiling serving (\d+) model\(s\) on ([\d.]+):(\d+)")


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the reason and its log tail."""


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an inferd subprocess: ours without INFERD_* (so the caller's settings
    never leak into the server), unbuffered output, plus `env`."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


class ServerProcess:
    """A server subprocess; `port` is its gRPC port once known (0 before)."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        port: int = 0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.port = port
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "wb")
        try:
            self.process = subprocess.Popen(
                self.command,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                # Its own process group: stop() reaches the workers a server forks (MLServer's,
                # Triton's Python-backend stubs), and a Ctrl-C meant for us does not reach it.
                start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def target(self) -> str:
        """The gRPC address, `127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def describe(self) -> str:
        """A header and the log tail, for error and assertion messages."""
        rc = self.process.poll()
        state = "running" if rc is None else f"exited with {rc}"
        return f"--- {self.name} {self.target} ({state}), log {self.log_path}:\n{self.log_tail()}"

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `ready` until true; ServerStartError (the server killed) when the server exits
        or `timeout` s pass first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                self.stop(signal.SIGKILL, timeout=10)
                raise ServerStartError(f"{self.name} exited before {what}\n{self.describe()}")
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL, timeout=10)
                raise ServerStartError(
                    f"{self.name}: no {what} after {timeout:.0f} s\n{self.describe()}"
                )
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        """`sig` to the server process alone, if it still runs."""
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """`sig` to the server's process group, up to `timeout` s to exit, then SIGKILL;
        returns the exit code. Safe to call again (it then only reports the code)."""
        if self.process.poll() is None:
            self._signal_group(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        return self.process.returncode

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InferdProcess(ServerProcess):
    """An `inferd serve` subprocess; `metrics_port` is -1 with metrics off."""

    def __init__(
        self,
        repository: Path,
        command: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__("inferd", command, log_path, env=env, cwd=log_path.parent)
        self.repository = Path(repository)
        self.metrics_port = -1
        self.models = 0

    def read_ready_line(self) -> bool:
        """True once the log has the "inferd serving" line; takes the ports and model count."""
        match = READY_LINE.search(self.log_text())
        if match is None:
            return False
        self.models = int(match.group(1))
        self.port = int(match.group(3))
        self.metrics_port = -1 if match.group(4) == "off" else int(match.group(4))
        return True


def start_inferd(
    repository: Path,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    metrics: bool = True,
    timeout: float = STARTUP_TIMEOUT_S,
) -> InferdProcess:
    """`python -m inferd.cli serve --model-repository REPOSITORY` on free loopback ports (the
    metrics port too, unless `metrics` is False), its output in `log_path`, its working
    directory log_path's folder; returns once grpc.health.v1 says SERVING.

    `env` is added to `server_env()`; `extra_args` go after the serve flags."""
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
        "0" if metrics else "-1",
        *extra_args,
    ]
    server = InferdProcess(repository, command, log_path, env=server_env(env))
    deadline = time.monotonic() + timeout
    server.wait_until(server.read_ready_line, timeout, "'inferd serving' line")
    wait_serving(server, deadline)
    return server


def start_ceiling(
    repository: Path, log_path: Path, *, timeout: float = STARTUP_TIMEOUT_S
) -> ServerProcess:
    """The framework ceiling (`python -m inferd.loadtest.bench.ceiling`) on the models of
    `repository`, on a free loopback port; returns once grpc.health.v1 says SERVING."""
    command = [
        sys.executable,
        "-m",
        "inferd.loadtest.bench.ceiling",
        "--model-repository",
        str(repository),
        "--port",
        "0",
    ]
    server = ServerProcess(
        "inferd-ceiling", command, log_path, env=server_env(), cwd=log_path.parent
    )
    deadline = time.monotonic() + timeout

    def ready() -> bool:
        match = CEILING_READY_LINE.search(server.log_text())
        if match is not None:
            server.port = int(match.group(3))
        return match is not None

    server.wait_until(ready, timeout, "'inferd-ceiling serving' line")
    wait_serving(server, deadline)
    return server


def wait_serving(server: ServerProcess, deadline: float) -> None:
    """Until grpc.health.v1 answers SERVING at `server.target` (ServerStartError at
    `deadline`, a monotonic time; at least a second is allowed)."""
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        server.wait_until(
            lambda: _serving(health),
            max(deadline - time.monotonic(), 1.0),
            "SERVING from grpc.health.v1",
        )


def _serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
