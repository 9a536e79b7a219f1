"""The inferd client: numpy arrays in, numpy arrays out, over gRPC.

    import numpy as np
    from inferd_client import InferClient

    with InferClient("127.0.0.1:8001") as c:
        out = c.infer("resnet50", {"input": np.zeros((1, 3, 224, 224), np.float32)})
        print(out["output"].shape, c.health())

`AsyncInferClient` is the same API for asyncio (`async with`, `await`, `async for`). Failed
requests raise InferError subclasses (ModelNotFoundError, InvalidInputError, ServerBusyError,
...), each carrying the gRPC `.code` and the server's `.details`.
"""

from inferd_client.aio import AsyncInferClient
from inferd_client.errors import (
    DeadlineExceededError,
    InferError,
    InvalidInputError,
    ModelNotFoundError,
    RequestCancelledError,
    ServerBusyError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
    error_from_status,
)
from inferd_client.sync import InferClient
from inferd_client.types import (
    ModelMetadata,
    ModelStatusEvent,
    RepositoryEntry,
    StreamRequest,
    StreamResult,
    TensorInfo,
    VersionStatus,
)

__all__ = [
    "AsyncInferClient",
    "DeadlineExceededError",
    "InferClient",
    "InferError",
    "InvalidInputError",
    "ModelMetadata",
    "ModelNotFoundError",
    "ModelStatusEvent",
    "RepositoryEntry",
    "RequestCancelledError",
    "ServerBusyError",
    "StreamRequest",
    "StreamResult",
    "TensorInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "VersionStatus",
    "error_from_rpc",
    "error_from_status",
]
