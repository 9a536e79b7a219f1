"""Execution slots: what one in-flight batch owns while it runs.

A model version has `instances` slots; each runs one batch at a time on its own thread, so a
slot's buffers are reused batch after batch without locks. Three kinds, chosen by the runtime:

- `PlainSlot` (the CPU default, and any model with string tensors): `session.run` on numpy
  arrays; ONNX Runtime reads the CPU arrays in place.
- `BindingSlot` (CUDA): requests are concatenated into the slot's pinned staging buffers, bound
  as the inputs (ONNX Runtime copies them to the device on its own stream), outputs are bound
  to device memory and copied back once after the run. Runs on the CPU too (outputs bound to
  "cpu"), which is how CI exercises it.
- `GraphSlot` (CUDA graphs, in `runtime/cuda_graphs.py`): fixed device buffers per bucket,
  replayed.

A slot's staged inputs are only valid until its next batch: results are always fresh arrays
(ONNX Runtime's own for `run`, a copy for IO binding), never views of a staging buffer.

Every run carries the slot's `RunOptions` (`run_options`): ONNX Runtime's own logging off, and
with `cpu_memory_arena = "shrink"` the CPU arena's free regions returned after the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from inferd.core.runtime.buckets import pad_rows
from inferd.core.runtime.staging import HostStaging
from inferd.core.types import Array

Feeds = Mapping[str, Array]

# ONNX Runtime's log severity for sessions and runs: FATAL only. A failing run otherwise prints
# an ANSI-coloured "[E:onnxruntime:...]" line on stderr (fd 2, from C++) besides the exception
# that carries the same message, which the batcher answers and inferd logs as JSON. Runs whose
# options set no severity (CUDA graph replays, runtime/cuda_graphs.py) inherit the session's.
ORT_LOG_SEVERITY = 4
# Run option returning the CPU arena's wholly free regions to the system after each run
# (onnxruntime_run_options_config_keys.h); only valid while the session's CPU arena is on.
SHRINK_ARENAS = "memory.enable_memory_arena_shrinkage"


def run_options(shrink_cpu_arena: bool = False) -> ort.RunOptions:
    """A slot's options for every run: ONNX Runtime's logging off, and optionally the CPU arena
    shrunk after each run. The GPU arena is never shrunk here: freeing and reallocating device
    memory every run would synchronise the device, and a CUDA graph replays fixed addresses."""
    options = ort.RunOptions()
    options.log_severity_level = ORT_LOG_SEVERITY
    if shrink_cpu_arena:
        options.add_run_config_entry(SHRINK_ARENAS, "cpu:0")
    return options


class CudaUse(Protocol):
    """Entered around every call that uses the GPU (see `CaptureGate`, runtime/cuda_graphs.py)."""

    def use(self) -> contextlib.AbstractContextManager[None]: ...


class NoGate:
    """The CPU's gate: nothing to wait for."""

    def use(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class ExecutionSlot(Protocol):
    session: ort.InferenceSession

    def stage(self, batch: Sequence[Feeds], rows: int | None) -> Feeds:
        """The batch's inputs, concatenated along dim 0 and zero-padded to `rows`; None: the
        model has no batch dim and the one request runs as sent."""
        ...

    def run(self, feeds: Feeds, names: Sequence[str]) -> list[Array]:
        """The outputs `names`, as fresh host arrays."""
        ...

    def close(self) -> None: ...


def rows_in(batch: Sequence[Feeds]) -> int:
    return sum(int(next(iter(part.values())).shape[0]) for part in batch)


class PlainSlot:
    """`session.run` on host arrays; a reused (never pinned) staging buffer per input."""

    def __init__(
        self,
        session: ort.InferenceSession,
        gate: CudaUse | None = None,
        shrink_cpu_arena: bool = False,
    ) -> None:
        self.session = session
        self._gate = gate or NoGate()
        self._staging = HostStaging(pinned=False)
        self._run_options = run_options(shrink_cpu_arena)

    def stage(self, batch: Sequence[Feeds], rows: int | None) -> Feeds:
        first = batch[0]
        if rows is None or (len(batch) == 1 and rows_in(batch) == rows):
            return first
        if any(a.dtype == object for a in first.values()):
            # Strings cannot live in a reused byte buffer.
            return {
                name: pad_rows(np.concatenate([part[name] for part in batch]), rows)
                for name in first
            }
        return {
            name: self._staging.concatenate(name, [part[name] for part in batch], rows)
            for name in first
        }

    def run(self, feeds: Feeds, names: Sequence[str]) -> list[Array]:
        with self._gate.use():
            results: list[Array] = self.session.run(list(names), dict(feeds), self._run_options)
        return results

    def close(self) -> None:
        self._staging.release()


class BindingSlot:
    """IO binding: host inputs from the slot's staging buffers (pinned on CUDA), outputs on
    `device` ("cuda" or "cpu"), copied back to the host once."""

    def __init__(
        self,
        session: ort.InferenceSession,
        device: str,
        device_id: int = 0,
        gate: CudaUse | None = None,
        shrink_cpu_arena: bool = False,
    ) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self._gate = gate or NoGate()
        self._staging = HostStaging(pinned=device == "cuda", gate=self._gate)
        self._binding = session.io_binding()
        self._run_options = run_options(shrink_cpu_arena)
        # The slot's session may have CUDA graphs on (a GraphSlot's fallback): never capture
        # here, where buffers move from run to run.
        self._run_options.add_run_config_entry("gpu_graph_id", "-1")

    @property
    def pinned(self) -> bool:
        return self._staging.pinned

    def stage(self, batch: Sequence[Feeds], rows: int | None) -> Feeds:
        if rows is None:
            return {name: np.ascontiguousarray(a) for name, a in batch[0].items()}
        first = batch[0]
        return {
            name: self._staging.concatenate(name, [part[name] for part in batch], rows)
            for name in first
        }

    def run(self, feeds: Feeds, names: Sequence[str]) -> list[Array]:
        binding = self._binding
        for name, array in feeds.items():
            # Bound by address: `feeds` outlives the run, and host memory is copied to the
            # device by ONNX Runtime before any kernel reads it.
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        binding.clear_binding_outputs()
        for name in names:
            binding.bind_output(name, self.device, self.device_id)
        with self._gate.use():
            self.session.run_with_iobinding(binding, self._run_options)
            outputs: list[Array] = binding.copy_outputs_to_cpu()
        return outputs

    def close(self) -> None:
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._staging.release()
