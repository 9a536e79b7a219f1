"""`inferd serve --workers N`: starts the engine and N frontends as new interpreters (spawned,
never forked: grpcio's fork support is fragile), restarts any that dies, and drains them in
order on SIGTERM: the frontends first (each answers what it accepted, the engine still
running), then the engine.

Processes report that they are up on a pipe (`workers/__main__.py`). The server is up, and says
so with the same line a single process logs, once the engine and every frontend are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from inferd.config import ServerConfig
from inferd.tls import TlsFiles
from inferd.workers.ipc import remove_shared
from inferd.workers.layout import RunLayout

log = logging.getLogger("inferd.workers")

CONFIG_ENV = "INFERD_WORKER_CONFIG"
# A process that dies sooner than this after its start is restarted after a growing pause
# (0.5 s, doubling, at most MAX_BACKOFF), so that a crash loop does not spin.
STABLE_AFTER_S = 10.0
MAX_BACKOFF_S = 10.0
# How long the engine is given, out of the grace period, once the frontends are done.
ENGINE_RESERVE_S = 1.0


class ChildExited(Exception):
    """A process exited before it was up (during the server's start)."""


class _Child:
    def __init__(self, role: str, index: int) -> None:
        self.role = role
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.quick_failures = 0
        self.ready: asyncio.Future[str] | None = None
        self.restarted = False

    @property
    def name(self) -> str:
        return self.role if self.role == "engine" else f"frontend {self.index}"


class Supervisor:
    def __init__(self, config: ServerConfig, layout: RunLayout, port: int, metrics_port: int):
        self.config = config
        self.layout = layout
        self.port = port
        self.metrics_port = metrics_port
        self.engine = _Child("engine", 0)
        self.frontends = [_Child("frontend", i) for i in range(config.workers)]
        self._stopping = False
        self._exits: asyncio.Queue[_Child] = asyncio.Queue()
        self._stop_requested = asyncio.Event()
        self._watchers: set[asyncio.Task[None]] = set()

    # -- processes -----------------------------------------------------------------------------

    def _child_config(self, role: str) -> dict[str, Any]:
        c = self.config
        data = c.model_dump(mode="json")
        data["control_token"] = (
            c.control_token.get_secret_value() if c.control_token is not None else None
        )
        data["port"] = self.port
        engine_reserve = min(ENGINE_RESERVE_S, c.grace_period_s / 4)
        if role == "engine":
            data.update(tls_cert=None, tls_key=None, tls_client_ca=None)
            data["metrics_port"] = self.metrics_port
        else:
            data["metrics_port"] = -1
            data["grace_period_s"] = c.grace_period_s - engine_reserve
            # The budget is the server's: each frontend holds its share (/metrics sums them).
            data["max_request_bytes_in_flight"] = max(c.max_request_bytes_in_flight // c.workers, 1)
        return data

    async def _spawn(self, child: _Child) -> None:
        read_fd, write_fd = os.pipe()
        env = dict(os.environ)
        env[CONFIG_ENV] = json.dumps(self._child_config(child.role))
        env["PROMETHEUS_MULTIPROC_DIR"] = str(self.layout.metrics)
        args = [
            sys.executable,
            "-m",
            "inferd.workers",
            child.role,
            "--run-dir",
            str(self.layout.root),
            "--shm-prefix",
            self.layout.shm_prefix,
            "--status-fd",
            str(write_fd),
            "--index",
            str(child.index),
        ]
        if child.restarted:
            args.append("--restarted")
        try:
            child.process = await asyncio.create_subprocess_exec(
                *args, env=env, pass_fds=(write_fd,)
            )
        finally:
            os.close(write_fd)
        child.started = time.monotonic()
        loop = asyncio.get_running_loop()
        child.ready = loop.create_future()
        task = loop.create_task(self._watch(child, child.process, read_fd, child.ready))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(
        self,
        child: _Child,
        process: asyncio.subprocess.Process,
        read_fd: int,
        ready: asyncio.Future[str],
    ) -> None:
        """Waits for the child's ready line, then for its exit."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb")
        )
        try:
            line = await reader.readline()
            if line and not ready.done():
                ready.set_result(line.decode().strip())
            await process.wait()
        finally:
            transport.close()
        if not ready.done():
            ready.set_exception(ChildExited(f"{child.name} exited with {process.returncode}"))
        # Its live gauges go; what it counted stays (prometheus-client's multiprocess files).
        mark_process_dead(process.pid, str(self.layout.metrics))
        remove_shared(f"{self.layout.shm_prefix}{process.pid}-")
        if not self._stopping:
            await self._exits.put(child)

    async def _start_all(self) -> str:
        """The engine, then every frontend; the engine's ready line."""
        ready = await self._start(self.engine)
        await asyncio.gather(*(self._start(f) for f in self.frontends))
        return ready

    async def _start(self, child: _Child) -> str:
        await self._spawn(child)
        assert child.ready is not None
        return await child.ready

    async def _restart(self, child: _Child) -> None:
        assert child.process is not None
        lived = time.monotonic() - child.started
        child.quick_failures = child.quick_failures + 1 if lived < STABLE_AFTER_S else 0
        pause = (
            min(0.5 * 2 ** (child.quick_failures - 1), MAX_BACKOFF_S) if child.quick_failures else 0
        )
        log.error(
            "%s (pid %d) exited with %s after %.1f s; restarting%s",
            child.name,
            child.process.pid,
            child.process.returncode,
            lived,
            f" in {pause:.1f} s" if pause else "",
        )
        if pause:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), pause)
        if self._stop_requested.is_set() or self._stopping:
            return
        child.restarted = True
        await self._spawn(child)

    # -- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_hangup)
        # Up once every process says so; a process that dies meanwhile (even one already up)
        # fails the start, and a signal meanwhile stops it.
        starting = loop.create_task(self._start_all())
        stopping = loop.create_task(self._stop_requested.wait())
        exited = loop.create_task(self._exits.get())
        await asyncio.wait({starting, stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done() or starting.exception() is not None:
            starting.cancel()
            exited.cancel()
            stopping.cancel()
            if self._stop_requested.is_set():
                log.info("signal received while starting: stopping")
                await self._stop_all(grace=self.config.grace_period_s)
                return 0
            reason = (
                starting.exception()
                if starting.done() and not starting.cancelled()
                else f"{exited.result().name} exited"
                if exited.done() and not exited.cancelled()
                else "a process exited"
            )
            log.error("inferd did not start: %s", reason)
            await self._stop_all(grace=0.0)
            return 1
        exited.cancel()
        stopping.cancel()
        models = int(starting.result().split()[-1])
        c = self.config
        log.info(
            "inferd serving %d model(s) on %s:%d (metrics on port %s)",
            models,
            c.host,
            self.port,
            self.metrics_port if c.metrics_port >= 0 else "off",
            extra={
                "workers": c.workers,
                "engine_pid": self._pid(self.engine),
                "run_dir": str(self.layout.root),
            },
        )
        stopping = loop.create_task(self._stop_requested.wait())
        while True:
            exited = loop.create_task(self._exits.get())
            done, _ = await asyncio.wait({stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
            if stopping in done:
                exited.cancel()
                break
            await self._restart(exited.result())
        log.info("signal received: draining %d frontend(s), then the engine", c.workers)
        await self._stop_all(c.grace_period_s)
        return 0

    def _forward_hangup(self) -> None:
        for child in self.frontends:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGHUP)

    @staticmethod
    def _pid(child: _Child) -> int:
        return child.process.pid if child.process is not None else 0

    async def _stop_all(self, grace: float) -> None:
        """SIGTERM to the frontends, then, once they are gone, to the engine; SIGKILL to any
        still there when the grace period is over."""
        self._stopping = True
        started = time.monotonic()
        await _terminate([f.process for f in self.frontends], started + grace)
        await _terminate([self.engine.process], started + grace + 0.5)
        await asyncio.gather(*self._watchers, return_exceptions=True)
        log.info("inferd stopped %.2f s after the drain began", time.monotonic() - started)


async def _terminate(processes: list[asyncio.subprocess.Process | None], deadline: float) -> None:
    running = [p for p in processes if p is not None and p.returncode is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            await asyncio.wait_for(process.wait(), max(deadline - time.monotonic(), 0.1))
        except TimeoutError:
            log.error("pid %d did not stop within the grace period: killed", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind the gRPC port with SO_REUSEPORT, without listening: it fails if another server
    holds the port, picks one for port 0, and keeps it for the frontends (and for any that is
    restarted) without taking any of their connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As gRPC binds: closed connections in TIME_WAIT do not hold the port; a listener
            # does (OSError, EADDRINUSE).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reservation.bind((host, port))
    return reservation, reservation.getsockname()[1]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def supervise(config: ServerConfig) -> int:
    """Serve with `config.workers` frontends and one engine until SIGTERM or SIGINT; the exit
    code."""
    # Bad TLS files refuse the start here, before any process starts (TlsConfigError).
    TlsFiles.from_settings(config.tls_cert, config.tls_key, config.tls_client_ca)
    root = Path(tempfile.mkdtemp(prefix="inferd-run-"))
    # The pid alone is not unique where servers in other pid namespaces share /dev/shm (two
    # containers of one pod), and it is guessable.
    layout = RunLayout(root, f"inferd-{os.getpid()}-{secrets.token_hex(4)}-")
    layout.metrics.mkdir()
    try:
        reservation, port = _reserve_port(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        shutil.rmtree(root, ignore_errors=True)
        return 1
    metrics_host = config.metrics_host or config.host
    metrics_port = config.metrics_port or _free_port(metrics_host)
    try:
        return await Supervisor(config, layout, port, metrics_port).run()
    finally:
        reservation.close()
        remove_shared(layout.shm_prefix)
        shutil.rmtree(root, ignore_errors=True)
