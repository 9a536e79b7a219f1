"""An InferenceServer in the test process, on an event loop of its own in a background thread:
for tests that reach into the server (its certificates, counters, `stop()`) and drive it with
blocking clients (InferClient, tritonclient) from the test's thread.

`inferd.app` is imported when a server starts, not with this module: a process that imports
tritonclient (see test_oip_tritonclient.py) imports the test module too, and must not load
inferd's `inference` protobuf package beside tritonclient's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    from inferd.app import InferenceServer

T = TypeVar("T")
START_TIMEOUT_S = 60.0


class ServerThread:
    """`with ServerThread(repository, tls_cert=..., ...) as s:` serves on 127.0.0.1:`s.port`.

    Settings are ServerConfig fields; the metrics endpoint is off unless `metrics_port` is
    given, and models run on the CPU."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        self.repository = repository
        self.settings = {"port": 0, "metrics_port": -1, **settings}
        self.settings.setdefault("models", {"execution_providers": ["cpu"]})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: InferenceServer | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = START_TIMEOUT_S) -> T:
        """Run `coroutine` on the server's loop; its result (or exception) here."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def start(self) -> Self:
        self._thread.start()

        async def start() -> InferenceServer:
            from inferd.app import InferenceServer
            from inferd.config import ServerConfig

            config = ServerConfig.load(None, model_repository=self.repository, **self.settings)
            server = InferenceServer(config)
            await server.start()
            return server

        try:
            self.server = self.run(start())
        except BaseException:
            self._close_loop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        """The server's graceful stop (health NOT_SERVING, new requests UNAVAILABLE, drain)."""
        if self.server is not None and not self._stopped:
            self._stopped = True
            self.run(self.server.stop(grace), timeout=grace + 30)

    def close(self) -> None:
        try:
            self.stop(1.0)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
