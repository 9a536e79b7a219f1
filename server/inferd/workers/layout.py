"""Where the processes of one `inferd serve --workers N` find each other: a private directory
made by the supervisor, holding the engine's sockets and prometheus-client's multiprocess
files, and the prefix of the shared-memory tensors they exchange."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RunLayout:
    root: Path
    shm_prefix: str
    """`/dev/shm` names of this server's shared tensors start with it (`workers/ipc.py`)."""

    @property
    def engine_ipc(self) -> Path:
        """The engine's socket for inference frames."""
        return self.root / "engine.sock"

    @property
    def engine_grpc(self) -> Path:
        """The engine's gRPC socket, for every RPC the frontends forward."""
        return self.root / "engine.grpc"

    @property
    def refusals(self) -> Path:
        """When each frontend last refused a request while draining (`frontend.py`)."""
        return self.root / "refusals"

    @property
    def metrics(self) -> Path:
        """PROMETHEUS_MULTIPROC_DIR of every process of the server."""
        return self.root / "metrics"
