"""ONNX Runtime sessions: provider selection and batch execution off the event loop.

A model version's `OnnxRuntimeSession` owns its ONNX Runtime session(s) and `instances`
execution slots (`runtime/slots.py`), one thread each. A batch takes a free slot, is
concatenated into that slot's staging buffers (`runtime/staging.py`; pinned on CUDA) and
zero-padded up to its batch bucket (`runtime/buckets.py`), runs (IO binding on CUDA; a replayed
CUDA graph per bucket with `cuda_graphs`, see `runtime/cuda_graphs.py`), and its outputs are
split back per request as views that stop at the real rows.

The session derives the model's signature from its graph and effective config (merged by the
load, `models/loading.py`), once: it needs it itself (buckets, binding, a TensorRT profile), and
the registry takes it from here.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import queue
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inferd.core.batching.batcher import BatchRun
from inferd.core.batching.policy import BatchingPolicy
from inferd.core.errors import InvalidInput
from inferd.core.models.config import (
    CpuMemoryArena,
    EffectiveConfig,
    ModelConfig,
    ModelDefaults,
    ProviderOptions,
)
from inferd.core.models.signature import GraphTensor, derive_signature
from inferd.core.runtime.buckets import bucket_for, resolve_buckets
from inferd.core.runtime.cuda_graphs import CAPTURE_GATE, GraphSlot
from inferd.core.runtime.providers import (
    CUDA,
    TENSORRT,
    cuda_options,
    device_id,
    tensorrt_options,
)
from inferd.core.runtime.slots import (
    ORT_LOG_SEVERITY,
    BindingSlot,
    CudaUse,
    ExecutionSlot,
    NoGate,
    PlainSlot,
    rows_in,
)
from inferd.core.types import Array, ModelSignature
from inferd_wire.codec import DTYPES

log = logging.getLogger(__name__)

# ONNX Runtime's process-wide logger (environment, allocators, provider libraries): as quiet as
# the sessions' and runs' own (runtime/slots.py). What goes wrong reaches inferd as exceptions.
ort.set_default_logger_severity(ORT_LOG_SEVERITY)

PROVIDER_NAMES = {
    "tensorrt": TENSORRT,
    "cuda": CUDA,
    "cpu": "CPUExecutionProvider",
}
_GPU_PROVIDERS = {"tensorrt", "cuda"}
# Datatypes IO binding takes by address; others (strings, bfloat16) run through `session.run`.
_BINDABLE = {name for name in DTYPES if name not in ("BYTES", "BF16")}

Providers = list[tuple[str, dict[str, Any]]]


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
    preferences: Sequence[str],
    options: Mapping[str, ProviderOptions],
    cuda_graphs: bool = False,
) -> Providers:
    """ONNX Runtime (provider, options) pairs in order, skipping GPU providers without a usable
    GPU; CPU always comes last as the fallback. Options are the config's, unchanged, plus
    inferd's defaults for what it leaves out (see `runtime/providers.py`)."""
    chosen: Providers = []
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
            provider_options = cuda_options(provider_options, cuda_graphs)
        chosen.append((PROVIDER_NAMES[key], provider_options))
    if not any(name == PROVIDER_NAMES["cpu"] for name, _ in chosen):
        chosen.append((PROVIDER_NAMES["cpu"], dict(options.get("cpu", {}))))
    if skipped:
        _log_gpu_unusable_once(tuple(skipped))
    return chosen


@functools.cache
def _log_gpu_unusable_once(skipped: tuple[str, ...]) -> None:
    log.info("no usable CUDA GPU; skipping %s, running on CPU", ", ".join(skipped))


ALLOW_SPINNING = "session.intra_op.allow_spinning"


def _load(
    path: Path,
    providers: Sequence[tuple[str, dict[str, Any]]],
    intra_op_threads: int,
    cpu_memory_arena: CpuMemoryArena = "keep",
    spinning: bool = True,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.log_severity_level = ORT_LOG_SEVERITY
    options.enable_cpu_mem_arena = cpu_memory_arena != "off"
    if not spinning:
        options.add_session_config_entry(ALLOW_SPINNING, "0")
    return ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )


def _graph_tensors(
    session: ort.InferenceSession,
) -> tuple[tuple[GraphTensor, ...], tuple[GraphTensor, ...]]:
    return (
        tuple(GraphTensor(i.name, i.type, tuple(i.shape)) for i in session.get_inputs()),
        tuple(GraphTensor(o.name, o.type, tuple(o.shape)) for o in session.get_outputs()),
    )


# A batch predicted to run in less than this runs on the event loop instead of a slot's
# thread: handing it over and back (run_in_executor, the worker's wake-up, the result's
# call_soon_threadsafe) took ~120 µs of wall time and ~110 µs of CPU per round trip on the
# 2-core development machine (`scripts/measure_handoff.py`), more than the tiny models' whole
# run (demo mlp: 40-90 µs per batch). Longer runs still go to threads, so the loop never
# stalls for long. A process whose loop serves no gRPC (the engine of `--workers N`) takes a
# longer bound (`set_inline_below`).
INLINE_BELOW = 100e-6


def set_inline_below(seconds: float) -> None:
    """Run batches predicted shorter than `seconds` on the event loop, in this process."""
    global INLINE_BELOW
    INLINE_BELOW = seconds


def _elements(batch: Sequence[Mapping[str, Array]]) -> int:
    """Input elements of a batch: what its run time is predicted from."""
    return sum(array.size for inputs in batch for array in inputs.values())


class RunTimeEstimate:
    """A moving average of a batch's run time and size, predicting a batch's run time as linear
    in its size (an overestimate where a fixed cost dominates: the safe side for inlining).
    The size is the batch's input elements, not its rows: a model without a batch dim, or one
    whose sequence length varies, has requests of one row and any size. No prediction
    (infinity) before the first run, so nothing runs inline unmeasured."""

    __slots__ = ("_seconds", "_size")

    WEIGHT = 0.2

    def __init__(self) -> None:
        self._seconds: float | None = None
        self._size = 1.0

    def observe(self, size: int, seconds: float) -> None:
        if self._seconds is None:
            self._seconds, self._size = seconds, float(size)
            return
        self._seconds += self.WEIGHT * (seconds - self._seconds)
        self._size += self.WEIGHT * (size - self._size)

    def predict(self, size: int) -> float:
        if self._seconds is None:
            return float("inf")
        return self._seconds * max(1.0, size / self._size)


class OnnxRuntimeSession:
    """The ONNX Runtime session(s) of one model version and its execution slots.

    Construction loads the model (and on CUDA with `cuda_graphs`, captures a graph per bucket
    and slot) and blocks: call it off the event loop. `execute` runs a batch on the session's
    own thread pool (one thread per slot); ONNX Runtime releases the GIL while it runs, so the
    event loop keeps serving.

    `effective` (the version's config over the server's defaults) gives the execution fields
    (batch_buckets, cuda_graphs, session_per_instance, cpu_memory_arena) and what the batch
    dim is; left out, an empty config over the built-in defaults. Threads and slots are
    arguments of their own, so a caller may open fewer than configured (`inferd models validate`
    opens one).
    `io_binding` None binds on CUDA only; True binds on the CPU too (tests).
    """

    def __init__(
        self,
        path: Path,
        providers: Sequence[tuple[str, dict[str, Any]]],
        intra_op_threads: int = 0,
        instances: int = 1,
        name: str = "",
        effective: EffectiveConfig | None = None,
        io_binding: bool | None = None,
    ) -> None:
        if effective is None:
            effective = EffectiveConfig.merge(ModelConfig(), ModelDefaults())
        config = effective.config
        arena = effective.cpu_memory_arena
        spinning = effective.intra_op_spinning
        requested = [
            (p, cuda_options(o, config.cuda_graphs) if p == CUDA else dict(o)) for p, o in providers
        ]
        names = [p for p, _ in requested]
        wants_gpu = CUDA in names or TENSORRT in names
        signature: ModelSignature | None = None
        buckets: tuple[int, ...] = ()
        if TENSORRT in names:
            # TensorRT builds its engine at session creation, so the profile (from the batch
            # buckets) must be known before: read the graph once on the CPU first.
            probe = _load(path, [("CPUExecutionProvider", {})], 1)
            signature = derive_signature(*_graph_tensors(probe), effective)
            del probe
            buckets = resolve_buckets(config.batch_buckets, signature.max_batch_size, True)
            requested = [
                (p, tensorrt_options(o, signature.inputs, buckets, config.cuda_graphs))
                if p == TENSORRT
                else (p, o)
                for p, o in requested
            ]
        gate: CudaUse = CAPTURE_GATE if wants_gpu else NoGate()
        with gate.use():
            first = _load(path, requested, intra_op_threads, arena, spinning)
        self.providers: tuple[str, ...] = tuple(first.get_providers())
        graph_inputs, graph_outputs = _graph_tensors(first)
        self.inputs = graph_inputs
        self.outputs = graph_outputs
        self._output_names = [o.name for o in self.outputs]
        on_cuda = self.providers[0] in (CUDA, TENSORRT)
        if signature is None:
            signature = derive_signature(graph_inputs, graph_outputs, effective)
            buckets = resolve_buckets(config.batch_buckets, signature.max_batch_size, on_cuda)
        self.signature: ModelSignature = signature
        self.buckets = buckets
        self._batches = signature.max_batch_size > 0
        bindable = all(t.datatype in _BINDABLE for t in (*signature.inputs, *signature.outputs))
        use_binding = bindable and (on_cuda if io_binding is None else io_binding)
        device = "cuda" if on_cuda else "cpu"
        gpu = device_id(requested)
        use_graphs = config.cuda_graphs and on_cuda and bindable
        if config.cuda_graphs and not use_graphs:
            log.info(
                "model '%s': cuda_graphs ignored: %s",
                name or path.parent.name,
                "string or bfloat16 tensors" if on_cuda else "not running on CUDA",
            )
        if use_graphs:
            _require_graphable(signature, buckets)
        per_instance = config.session_per_instance or use_graphs
        sessions = [first]
        if per_instance:
            with gate.use():
                sessions += [
                    _load(path, requested, intra_op_threads, arena, spinning)
                    for _ in range(instances - 1)
                ]
        self._sessions = sessions
        # GraphSlots keep their own run options (runtime/cuda_graphs.py): they never shrink.
        shrink = arena == "shrink"
        self._slots: list[ExecutionSlot] = []
        for index in range(instances):
            session = sessions[index % len(sessions)]
            slot: ExecutionSlot
            if use_graphs:
                slot = GraphSlot(session, device, gpu)
            elif use_binding:
                slot = BindingSlot(
                    session, device, gpu, gate if on_cuda else NoGate(), shrink_cpu_arena=shrink
                )
            else:
                slot = PlainSlot(session, gate if on_cuda else NoGate(), shrink_cpu_arena=shrink)
            self._slots.append(slot)
        self._per_slot_warmup = on_cuda or per_instance
        self._gate = gate
        self._free: queue.SimpleQueue[ExecutionSlot] = queue.SimpleQueue()
        for slot in self._slots:
            self._free.put(slot)
        try:
            if use_graphs:
                self._capture_graphs(signature)
        except BaseException:
            self.close(wait=False)
            raise
        self._pool = ThreadPoolExecutor(
            max_workers=instances, thread_name_prefix=f"ort-{name or path.parent.name}"
        )
        self._run_time = RunTimeEstimate()
        if buckets:
            log.info(
                "model '%s': batch buckets %s on %s (%d slot(s), %d session(s)%s)",
                name or path.parent.name,
                list(buckets),
                self.providers[0],
                instances,
                len(sessions),
                ", CUDA graphs" if use_graphs else "",
            )

    def _capture_graphs(self, signature: ModelSignature) -> None:
        for slot in self._slots:
            assert isinstance(slot, GraphSlot)
            for rows in self.buckets:
                sample = {
                    spec.name: np.zeros((rows, *spec.dims), dtype=DTYPES[spec.datatype])
                    for spec in signature.inputs
                }
                slot.capture(sample)

    def warmup_batch_sizes(self, policy: BatchingPolicy) -> list[int]:
        """Batch sizes for warm-up to run, in order: every bucket (or, without buckets, 1, the
        preferred sizes and the maximum), once per slot where slots have their own session or
        staging buffers to prepare (slots are taken round-robin)."""
        if policy.max_batch_size == 0:
            sizes = [1]
        elif self.buckets:
            sizes = list(self.buckets)
        else:
            sizes = sorted({1, *policy.preferred_batch_sizes, policy.max_batch_size})
        repeat = len(self._slots) if self._per_slot_warmup else 1
        return [size for size in sizes for _ in range(repeat)]

    async def execute(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun:
        real = rows_in(batch) if self._batches else 1
        size = _elements(batch)
        run = self._run_if_short(batch, outputs, real, size)
        if run is None:
            loop = asyncio.get_running_loop()
            run = await loop.run_in_executor(self._pool, self.run_batch, batch, outputs, real)
            self._run_time.observe(size, run.input_time + run.infer_time + run.output_time)
        return run

    def run_inline(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str]
    ) -> BatchRun | None:
        """Run the batch on the calling thread when its predicted run time is under
        INLINE_BELOW; None otherwise."""
        real = rows_in(batch) if self._batches else 1
        return self._run_if_short(batch, outputs, real, _elements(batch))

    def _run_if_short(
        self, batch: Sequence[Mapping[str, Array]], outputs: Sequence[str], real: int, size: int
    ) -> BatchRun | None:
        if self._run_time.predict(size) >= INLINE_BELOW:
            return None
        run = self.run_batch(batch, outputs, real)
        self._run_time.observe(size, run.input_time + run.infer_time + run.output_time)
        return run

    def run_batch(
        self,
        batch: Sequence[Mapping[str, Array]],
        outputs: Sequence[str],
        real: int | None = None,
    ) -> BatchRun:
        """Concatenate the requests along dim 0 (padded to the batch bucket), run once, and
        split the outputs back: views of each request's rows, never a padding row. `real` is
        the batch's rows, when the caller has counted them."""
        names = list(outputs) or self._output_names
        t0 = time.perf_counter()
        if real is None:
            real = rows_in(batch) if self._batches else 1
        rows = bucket_for(real, self.buckets) if self._batches else None
        slot = self._free.get()
        try:
            feeds = slot.stage(batch, rows)
            t1 = time.perf_counter()
            results = slot.run(feeds, names)
            t2 = time.perf_counter()
        finally:
            self._free.put(slot)
        if rows is None or (len(batch) == 1 and rows == real):
            split = [dict(zip(names, results, strict=True))]
        else:
            split = self._split(batch, names, results, rows)
        return BatchRun(split, t1 - t0, t2 - t1, time.perf_counter() - t2)

    @staticmethod
    def _split(
        batch: Sequence[Mapping[str, Array]],
        names: list[str],
        results: list[Array],
        rows: int,
    ) -> list[dict[str, Array]]:
        for name, result in zip(names, results, strict=True):
            if result.ndim == 0 or result.shape[0] != rows:
                raise RuntimeError(
                    f"output '{name}' has shape {list(result.shape)}; "
                    f"expected dim 0 = {rows} rows for the batch"
                )
        split: list[dict[str, Array]] = []
        start = 0
        for part in batch:
            size = int(next(iter(part.values())).shape[0])
            split.append({n: r[start : start + size] for n, r in zip(names, results, strict=True)})
            start += size
        return split

    @property
    def closed(self) -> bool:
        """Whether `close` has dropped the sessions, buffers and device memory."""
        return not self._sessions

    def close(self, wait: bool = True) -> None:
        """Wait for running batches, then drop the sessions, buffers and device memory."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=wait)
        # Freeing device memory is a CUDA call: never during another model's graph capture.
        with self._gate.use():
            for slot in self._slots:
                slot.close()
            self._slots.clear()
            # The free list holds the slots (and through them the sessions) too: emptied here,
            # so that everything is released now, under the gate, even while this object is
            # still referenced (a closed LoadedVersion keeps its session).
            self._free = queue.SimpleQueue()
            self._sessions.clear()


def _require_graphable(signature: ModelSignature, buckets: Sequence[int]) -> None:
    if not buckets:
        raise InvalidInput(
            "cuda_graphs needs batch buckets: a model with a batch dim (max_batch_size > 0) "
            "and batch_buckets not []"
        )
    for spec in signature.inputs:
        if any(d < 0 for d in spec.dims):
            raise InvalidInput(
                f"cuda_graphs needs fixed input shapes: input '{spec.name}' has dims "
                f"{list(spec.dims)} after the batch dim; declare them in config.toml "
                f'(inputs = [{{name = "{spec.name}", datatype = "{spec.datatype}", '
                f"dims = [...]}}])"
            )
