"""`python -m inferd.workers engine|frontend ...`: one process of `inferd serve --workers N`,
started by `workers/supervisor.py` (its config in the INFERD_WORKER_CONFIG environment
variable, prometheus-client's multiprocess directory in PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from inferd.app import InferenceServer
from inferd.config import ServerConfig
from inferd.observability.logging import configure_logging
from inferd.workers.ipc import remove_shared
from inferd.workers.layout import RunLayout
from inferd.workers.supervisor import CONFIG_ENV

_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """SIGTERM this process when the supervisor dies (even by SIGKILL), so that no process of
    the server outlives it. Linux only; elsewhere the supervisor's own stop is all there is."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


async def _run(
    role: str, config: ServerConfig, layout: RunLayout, status_fd: int, restarted: bool, index: int
) -> None:
    from inferd.observability.worker_metrics import WorkerMetrics

    supervisor = os.getppid()

    if role == "engine":
        from inferd.workers.engine import EngineServer

        server: InferenceServer = EngineServer(config, layout, config.workers)
    else:
        from inferd.workers.frontend import FrontendServer

        server = FrontendServer(config, layout, index)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop_requested.set)
    # The supervisor decides when to stop: Ctrl-C reaches every process of the terminal's group.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: loop.run_in_executor(None, server.reload_certificates)
    )
    # A signal before the start is done (a frontend waiting for an engine that never comes)
    # stops it there: nothing is serving yet.
    starting = loop.create_task(server.start())
    stopping = loop.create_task(stop_requested.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    starting.result()
    WorkerMetrics().started(role, restarted)
    os.write(
        status_fd, f"{role} {os.getpid()} ready {len(server.registry.model_names())}\n".encode()
    )
    os.close(status_fd)
    await stop_requested.wait()
    await server.stop()
    if role == "engine" and os.getppid() != supervisor:
        # The supervisor was killed (its children got SIGTERM, and the engine stops last):
        # nobody else will remove the run's directory and shared tensors.
        remove_shared(layout.shm_prefix)
        shutil.rmtree(layout.root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferd.workers")
    parser.add_argument("role", choices=("engine", "frontend"))
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--shm-prefix", required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    parser.add_argument("--restarted", action="store_true")
    parser.add_argument("--index", type=int, default=0, help="the frontend's number, from 0")
    args = parser.parse_args(argv)
    _stop_with_parent()
    config = ServerConfig(**json.loads(os.environ.pop(CONFIG_ENV)))
    configure_logging(config.log_level, config.log_format)
    layout = RunLayout(args.run_dir, args.shm_prefix)
    asyncio.run(_run(args.role, config, layout, args.status_fd, args.restarted, args.index))
    return 0


if __name__ == "__main__":
    sys.exit(main())
