"""CUDA graphs: one captured graph per batch bucket, replayed instead of launching each kernel.

ONNX Runtime's CUDA provider (`enable_cuda_graph`) records a run's kernels once and replays
them with one launch: measured in-process on an H100, ResNet-50 batch 1 in 0.86 ms instead of
2.28 ms (docs/gpu.md). Its rules, and how inferd keeps them:

- A graph replays fixed device addresses and fixed shapes. So each bucket gets its own device
  input and output buffers, bound once; a batch is padded to its bucket and copied into that
  bucket's input buffers; outputs are copied back from its output buffers. Every input's
  non-batch dims must be fixed (by the graph, or declared in config.toml).
- One session holds one graph per `gpu_graph_id` run option (ids from 1; 0 is ONNX Runtime's
  default). Replays of one graph share its buffers, so two threads must never replay the same
  session at once: with CUDA graphs every execution slot has its own session.
- ONNX Runtime captures with `cudaStreamCaptureModeGlobal`: while one thread captures, a CUDA
  call from any other thread (another model's run, a session being created) can fail that call
  or the capture. `CaptureGate` makes capture exclusive in the process; it happens only at
  load, so serving never waits on it.
- The whole graph must run on the CUDA provider (no CPU-placed nodes, no control flow such as
  If/Loop); otherwise ONNX Runtime refuses to capture and the load fails with its reason.
- ONNX Runtime runs a graph id normally first, then captures on the next run: each bucket is
  run three times at load, and the replay is checked against a run without the graph.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from inferd.core.runtime.slots import BindingSlot, CudaUse, Feeds
from inferd.core.runtime.staging import HostStaging
from inferd.core.types import Array

# Runs with the same id before its replay is trusted: 1 normal, 1 capture, 1 checked replay.
RUNS_TO_CAPTURE = 3


class CaptureGate:
    """Capture excludes every other use of CUDA in the process; uses run concurrently.

    A reader-writer lock that prefers the capture: once one waits, new uses wait behind it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._users = 0
        self._capturing = False

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        with self._changed:
            while self._capturing:
                self._changed.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._changed:
                self._users -= 1
                if self._users == 0:
                    self._changed.notify_all()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with self._changed:
            while self._capturing:
                self._changed.wait()
            self._capturing = True
            while self._users:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._capturing = False
                self._changed.notify_all()


CAPTURE_GATE = CaptureGate()


def shape_key(feeds: Feeds) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    return tuple((name, a.dtype.str, a.shape) for name, a in sorted(feeds.items()))


class _BucketGraph:
    """One bucket's fixed buffers and binding, and the run options naming its graph."""

    def __init__(
        self,
        session: ort.InferenceSession,
        sample: Feeds,
        outputs: Mapping[str, Array],
        device: str,
        device_id: int,
        graph_id: int,
    ) -> None:
        self.graph_id = graph_id
        self.inputs = {
            name: ort.OrtValue.ortvalue_from_numpy(np.array(a, order="C"), device, device_id)
            for name, a in sample.items()
        }
        self.outputs = {
            name: ort.OrtValue.ortvalue_from_shape_and_type(
                list(a.shape), a.dtype, device, device_id
            )
            for name, a in outputs.items()
        }
        self.output_names = list(outputs)
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def replay(self, session: ort.InferenceSession, feeds: Feeds) -> dict[str, Array]:
        for name, array in feeds.items():
            self.inputs[name].update_inplace(array)
        session.run_with_iobinding(self.binding, self.run_options)
        copied: list[Array] = self.binding.copy_outputs_to_cpu()
        return dict(zip(self.output_names, copied, strict=True))


class GraphSlot:
    """An execution slot on its own session with CUDA graphs: a captured graph per bucket,
    and plain IO binding (never captured) for any shape not captured.

    On the CPU (device "cpu") the same buffers and bindings run without graphs: CI covers
    this code that way."""

    def __init__(
        self,
        session: ort.InferenceSession,
        device: str,
        device_id: int = 0,
        gate: CaptureGate | None = None,
    ) -> None:
        self.session = session
        self.device = device
        self.device_id = device_id
        self._gate = gate or CAPTURE_GATE
        use: CudaUse = self._gate
        self._fallback = BindingSlot(session, device, device_id, use)
        self._staging = HostStaging(pinned=device == "cuda", gate=use)
        self._graphs: dict[tuple[tuple[str, str, tuple[int, ...]], ...], _BucketGraph] = {}

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def capture(self, sample: Feeds, rtol: float = 1e-3, atol: float = 1e-4) -> None:
        """Capture the graph for `sample`'s shapes (one bucket), alone in the process, and
        check its replay against a run without it. Raises if they differ."""
        key = shape_key(sample)
        if key in self._graphs:
            return
        with self._gate.capture():
            reference = self._fallback_run(sample)
            graph = _BucketGraph(
                self.session,
                sample,
                reference,
                self.device,
                self.device_id,
                graph_id=len(self._graphs) + 1,
            )
            for _ in range(RUNS_TO_CAPTURE):
                replayed = graph.replay(self.session, sample)
        for name, expected in reference.items():
            if not np.allclose(replayed[name], expected, rtol=rtol, atol=atol, equal_nan=True):
                raise RuntimeError(
                    f"CUDA graph {graph.graph_id} replay of output '{name}' differs from a run "
                    f"without the graph (shapes {[list(s) for _, _, s in key]})"
                )
        self._graphs[key] = graph

    def _fallback_run(self, feeds: Feeds) -> dict[str, Array]:
        names = [o.name for o in self.session.get_outputs()]
        # Called under the capture gate already: no second `use()`.
        binding = self.session.io_binding()
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "-1")
        contiguous = {name: np.ascontiguousarray(a) for name, a in feeds.items()}
        for name, array in contiguous.items():
            binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name in names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding, options)
        outputs: list[Array] = binding.copy_outputs_to_cpu()
        return dict(zip(names, outputs, strict=True))

    def stage(self, batch: Sequence[Feeds], rows: int | None) -> Feeds:
        if rows is None:
            return {name: np.ascontiguousarray(a) for name, a in batch[0].items()}
        first = batch[0]
        return {
            name: self._staging.concatenate(name, [part[name] for part in batch], rows)
            for name in first
        }

    def run(self, feeds: Feeds, names: Sequence[str]) -> list[Array]:
        graph = self._graphs.get(shape_key(feeds))
        if graph is None:
            return self._fallback.run(feeds, names)
        with self._gate.use():
            outputs = graph.replay(self.session, feeds)
        return [outputs[name] for name in names]

    def close(self) -> None:
        self._graphs.clear()
        self._fallback.close()
        self._staging.release()
