"""Servers the benchmark suite starts and stops itself, each on free loopback ports, with its
output in a log file whose tail explains a failed start."""

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
from typing import IO

PROJECT_ROOT = Path(__file__).resolve().parents[2]
INFERD_READY = re.compile(r"inferd serving (\d+) model\(s\) on ([\d.]+):(\d+)")


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the reason and its log tail."""


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ManagedServer:
    """A server subprocess: started in its own process group, stopped with SIGTERM then
    SIGKILL, its combined output in `log_path`."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.port = 0
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "wb")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                self.stop()
                raise ServerStartError(
                    f"{self.name} exited with {self.process.returncode} before {what}; "
                    f"log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"{self.name}: no {what} after {timeout:.0f} s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> ManagedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_inferd(
    repository: Path, workdir: Path, env: Mapping[str, str] | None = None
) -> ManagedServer:
    """`python -m inferd.cli serve` on a free port (metrics off); ready at its log line."""
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    server_env["PYTHONUNBUFFERED"] = "1"
    server_env.update(env or {})
    server = ManagedServer(
        "inferd",
        [
            sys.executable,
            "-m",
            "inferd.cli",
            "serve",
            "--model-repository",
            str(repository),
            "--port",
            "0",
            "--metrics-port",
            "-1",
        ],
        workdir / "inferd.log",
        env=server_env,
        cwd=PROJECT_ROOT,
    )

    def serving() -> bool:
        match = INFERD_READY.search(server.log_text())
        if match:
            server.port = int(match.group(3))
        return match is not None

    server.wait_until(serving, 60.0, "'inferd serving' line")
    return server
