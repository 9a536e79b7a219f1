"""Host staging buffers: where a batch's requests are concatenated before it runs.

One set per execution slot, reused batch after batch (a slot runs one batch at a time). On CUDA
the buffers are page-locked (pinned) with `cudaHostRegister`, so the copy to the device is a
DMA at full PCIe speed instead of a staged copy through a driver bounce buffer; elsewhere they
are plain memory and the reuse only saves an allocation per batch.

Pinning goes through the CUDA runtime library that onnxruntime-gpu itself loads: ONNX Runtime's
Python API (1.31) has no allocator for pinned host memory without a plugin CUDA EP. Where the
library or the registration fails, the buffer stays pageable: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from inferd.core.types import Array

log = logging.getLogger(__name__)

_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_REGISTER_PORTABLE = 1
_ALIGNMENT = 4096


@functools.cache
def _cudart() -> ctypes.CDLL | None:
    for name in _CUDART_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cudaHostRegister.restype = ctypes.c_int
        lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cudaHostUnregister.restype = ctypes.c_int
        return lib
    return None


@functools.cache
def _log_unpinned_once(reason: str) -> None:
    log.warning("staging buffers stay pageable (host-to-device copies are slower): %s", reason)


def pin(buffer: Array) -> bool:
    """Page-lock `buffer`'s memory for the CUDA devices; False (and one log line) if not."""
    lib = _cudart()
    if lib is None:
        _log_unpinned_once(f"none of {', '.join(_CUDART_NAMES)} could be loaded")
        return False
    status = lib.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, _REGISTER_PORTABLE)
    if status != 0:
        _log_unpinned_once(f"cudaHostRegister returned error {status}")
        return False
    return True


def unpin(buffer: Array) -> None:
    lib = _cudart()
    if lib is not None:
        lib.cudaHostUnregister(buffer.ctypes.data)


# Entered around (un)registration: a CUDA call, which must not run during a graph capture.
CudaScope = Callable[[], contextlib.AbstractContextManager[None]]


class _Gate(Protocol):
    def use(self) -> contextlib.AbstractContextManager[None]: ...


class StagingBuffer:
    """A reusable, growable host buffer for one input, pinned when `pinned` is asked for."""

    def __init__(self, pinned: bool, cuda_scope: CudaScope = contextlib.nullcontext) -> None:
        self._cuda_scope = cuda_scope
        self._want_pinned = pinned
        self._memory: Array = np.empty(0, dtype=np.uint8)
        # Views by (shape, dtype): buckets make the same few shapes recur batch after batch.
        self._views: dict[tuple[tuple[int, ...], str], Array] = {}
        # Bytes from the start that may be non-zero; everything after is zeros. Padding is
        # zeroed only where an earlier, larger batch wrote: a full memset per batch costs
        # milliseconds at ResNet-50's batch 128 (38 MB of padding at most).
        self._dirty = 0
        self.pinned = False

    @property
    def capacity(self) -> int:
        return int(self._memory.nbytes)

    def view(self, shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> Array:
        """A C-contiguous array of `shape` over the buffer (grown as needed; contents stale)."""
        key = (shape, dtype.str)
        view = self._views.get(key)
        if view is not None:
            return view
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.capacity:
            self._grow(nbytes)
        view = self._views[key] = self._memory[:nbytes].view(dtype).reshape(shape)
        return view

    def written(self, start: int, end: int) -> None:
        """Bytes [0, start) now hold data and [start, end) must read as zeros."""
        stop = min(end, self._dirty)
        if stop > start:
            self._memory[start:stop] = 0
        self._dirty = self._dirty if self._dirty > end else start

    def _grow(self, nbytes: int) -> None:
        self.release()
        # Page-aligned, so that registration pins exactly this buffer's pages; zeroed, so that
        # padding never reads stale or uninitialised memory.
        raw = np.zeros(nbytes + _ALIGNMENT, dtype=np.uint8)
        offset = -raw.ctypes.data % _ALIGNMENT
        self._memory = raw[offset : offset + nbytes]
        if self._want_pinned:
            with self._cuda_scope():
                self.pinned = pin(self._memory)

    def release(self) -> None:
        if self.pinned:
            with self._cuda_scope():
                unpin(self._memory)
            self.pinned = False
        self._views.clear()
        self._dirty = 0
        self._memory = np.empty(0, dtype=np.uint8)


class HostStaging:
    """One execution slot's staging buffers, one per input name. `gate`, when given, is
    entered around pinning (see `CaptureGate` in `runtime/cuda_graphs.py`)."""

    def __init__(self, pinned: bool, gate: _Gate | None = None) -> None:
        self._pinned = pinned
        self._scope: CudaScope = gate.use if gate is not None else contextlib.nullcontext
        self._buffers: dict[str, StagingBuffer] = {}

    def concatenate(self, name: str, parts: Sequence[Array], rows: int) -> Array:
        """`parts` concatenated along dim 0 into this slot's buffer for `name`, zero rows
        appended up to `rows`. The result is reused by the slot's next batch."""
        first = parts[0]
        real = sum(int(p.shape[0]) for p in parts)
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = StagingBuffer(self._pinned, self._scope)
        out = buffer.view((rows, *first.shape[1:]), first.dtype)
        if len(parts) == 1:
            out[:real] = first
        else:
            np.concatenate(parts, out=out[:real])
        row_bytes = out.nbytes // rows if rows else 0
        buffer.written(real * row_bytes, out.nbytes)
        return out

    @property
    def pinned(self) -> bool:
        """Whether every buffer allocated so far is pinned."""
        return all(b.pinned for b in self._buffers.values())

    def release(self) -> None:
        for buffer in self._buffers.values():
            buffer.release()
        self._buffers.clear()
