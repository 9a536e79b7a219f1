"""The ceiling: the same model file run by ONNX Runtime inside the worker, no server, no RPC.

The session is built as inferd builds its own (CPU provider, ONNX Runtime's default intra-op
threads, one shared session) and runs on a thread pool of `threads` workers (default 1, like
one inferd execution slot), so served ÷ in-process isolates what serving costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inferd.core.models.signature import ORT_DATATYPES
from inferd.loadtest.inputs import ModelSignature, Payload, TensorSpec
from inferd.loadtest.targets.target import (
    RequestFailed,
    RequestSender,
    TargetDriver,
    TargetError,
    TargetSpec,
)


def model_path(spec: TargetSpec) -> Path:
    """`where` is a model file, or a repository holding `<model>/<version>/model.onnx`
    (the newest numeric version unless the spec names one)."""
    where = Path(spec.where)
    if where.is_file():
        return where
    if not where.is_dir():
        raise TargetError(f"inprocess target: {where} is neither a model file nor a directory")
    if not spec.model:
        raise TargetError("inprocess target on a repository needs a model name (--model)")
    model_dir = where / spec.model
    if spec.version:
        path = model_dir / spec.version / "model.onnx"
    else:
        versions = sorted(
            (int(p.name) for p in model_dir.glob("*") if p.name.isdigit()), reverse=True
        )
        if not versions:
            raise TargetError(f"inprocess target: no numeric version under {model_dir}")
        path = model_dir / str(versions[0]) / "model.onnx"
    if not path.is_file():
        raise TargetError(f"inprocess target: {path} does not exist")
    return path


def create_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def session_signature(session: ort.InferenceSession, model: str) -> ModelSignature:
    inputs: list[TensorSpec] = []
    for graph_input in session.get_inputs():
        datatype = ORT_DATATYPES.get(graph_input.type)
        if datatype is None:
            raise TargetError(f"input '{graph_input.name}': type {graph_input.type} unsupported")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in graph_input.shape)
        inputs.append(TensorSpec(graph_input.name, datatype, shape))
    outputs = session.get_outputs()
    # inferd's rule: dim 0 batches when it is variable on every input and output.
    batched = all(t.shape and t.shape[0] == -1 for t in inputs) and all(
        o.shape and not isinstance(o.shape[0], int) for o in outputs
    )
    return ModelSignature(model=model, inputs=tuple(inputs), batched=batched)


def session_feeds(payload: Payload) -> dict[str, np.ndarray]:
    """ONNX Runtime takes string tensors as `str`, not `bytes`."""
    feeds: dict[str, np.ndarray] = {}
    for name, array in payload.items():
        if array.dtype.kind in ("O", "S"):
            array = np.array(
                [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)],
                dtype=object,
            ).reshape(array.shape)
        feeds[name] = array
    return feeds


class InprocessDriver(TargetDriver):
    def __init__(self, spec: TargetSpec) -> None:
        super().__init__(spec)
        self.path = model_path(spec)

    def signature(self) -> ModelSignature:
        return session_signature(create_session(self.path), self.spec.model or self.path.stem)

    def describe(self) -> dict[str, str]:
        return {
            "protocol": "none (onnxruntime in the worker)",
            "model_file": str(self.path),
            "onnxruntime": ort.__version__,
            "threads": str(self.spec.threads),
        }


class InprocessSender(RequestSender):
    def __init__(self, spec: TargetSpec, payloads: Sequence[Payload]) -> None:
        self._session = create_session(model_path(spec))
        self._feeds = [session_feeds(p) for p in payloads]
        self._pool = ThreadPoolExecutor(max_workers=max(1, spec.threads))

    async def send(self, payload_index: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._pool, self._session.run, None, self._feeds[payload_index]
            )
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise RequestFailed(type(exc).__name__, str(exc)) from None

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
