"""ONNX Runtime sessions: provider selection and batch execution off the event loop."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.core.batcher import BatchRun
from server.core.model_config import ProviderOptions
from server.core.signature import GraphTensor
from server.core.types import Array

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_GPU_PROVIDERS = {"tensorrt", "cuda"}


@functools.cache
def cuda_usable() -> bool:
    """Whether a CUDA device really answers: ONNX Runtime lists its CUDA provider whenever the
    onnxruntime-gpu wheel is installed, and asking for it on a machine without a GPU prints a
    long error before falling back. Probing the driver first keeps a CPU box to one log line."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0


def resolve_providers(
    preferences: Sequence[str], options: Mapping[str, ProviderOptions]
) -> list[tuple[str, dict[str, Any]]]:
    """ONNX Runtime (provider, options) pairs in order, skipping GPU providers without a usable
    GPU; CPU always comes last as the fallback."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    for key in preferences:
        key = key.lower()
        if key not in PROVIDER_NAMES:
            raise ValueError(
                f"execution provider '{key}' is unknown; expected one of {sorted(PROVIDER_NAMES)}"
            )
        if key in _GPU_PROVIDERS and not cuda_usable():
            skipped.append(key)
            continue
        provider_options: dict[str, Any] = dict(options.get(key, {}))
        if key == "cuda":
            # EXHAUSTIVE (ORT's default) searches again for every new input shape.
            provider_options.setdefault("cudnn_conv_algo_search", "HEURISTIC")
        chosen.append((PROVIDER_NAMES[key], provider_options))
    if not any(name == PROVIDER_NAMES["cpu"] for name, _ in chosen):
        chosen.append((PROVIDER_NAMES["cpu"], dict(options.get("cpu", {}))))
    if skipped:
        _log_gpu_unusable_once(tuple(skipped))
    return chosen


@functools.cache
def _log_gpu_unusable_once(skipped: tuple[str, ...]) -> None:
    log.info("no usable CUDA GPU; skipping %s, running on CPU", ", ".join(skipped))


class OnnxRuntimeSession:
    """One ONNX Runtime session for one model version, shared by its execution slots.

    Construction loads the model and blocks: call it off the event loop. `execute` runs a batch
    on the session's own thread pool (one thread per slot); ONNX Runtime releases the GIL while
    it runs, so the event loop keeps serving.
    """

    def __init__(
        self,
        path: Path,
        providers: Sequence[tuple[str, dict[str, Any]]],
        intra_op_threads: int = 0,
        instances: int = 1,
        name: str = "",
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            str(path),
            sess_options=options,
            providers=[name for name, _ in providers],
            provider_options=[opts for _, opts in providers],
        )
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        self.inputs = tuple(
            GraphTensor(i.name, i.type, tuple(i.shape)) for i in self._session.get_inputs()
        )
        self.outputs = tuple(
            GraphTensor(o.name, o.type, tuple(o.shape)) for o in self._session.get_outputs()
        )
        self._output_names = [o.name for o in self.outputs]
        self._pool = ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix=f"ort-{name or path.parent.name}"
        )

    async def execute(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.run_batch, batch, outputs)

    def run_batch(self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]) -> BatchRun:
        """Concatenate the requests along dim 0, run once, and split the outputs back (views,
        no copies). A single request runs as sent, without concatenation."""
        names = list(outputs) or self._output_names
        t0 = time.perf_counter()
        if len(batch) == 1:
            feeds = batch[0]
        else:
            feeds = {k: np.concatenate([part[k] for part in batch]) for k in batch[0]}
        t1 = time.perf_counter()
        results = self._session.run(names, feeds)
        t2 = time.perf_counter()
        if len(batch) == 1:
            split = [dict(zip(names, results, strict=True))]
        else:
            split = self._split(batch, names, results)
        return BatchRun(split, t1 - t0, t2 - t1, time.perf_counter() - t2)

    @staticmethod
    def _split(
        batch: Sequence[Mapping[str, Array]], names: list[str], results: list[Array]
    ) -> list[dict[str, Array]]:
        sizes = [len(next(iter(part.values()))) for part in batch]
        total = sum(sizes)
        for name, result in zip(names, results, strict=True):
            if result.ndim == 0 or result.shape[0] != total:
                raise RuntimeError(
                    f"output '{name}' has shape {list(result.shape)}; "
                    f"expected dim 0 = {total} rows for the batch"
                )
        split: list[dict[str, Array]] = []
        start = 0
        for size in sizes:
            split.append({n: r[start : start + size] for n, r in zip(names, results, strict=True)})
            start += size
        return split

    def close(self) -> None:
        """Wait for running batches, then drop the session and its memory."""
        self._pool.shutdown(wait=True)
        del self._session
