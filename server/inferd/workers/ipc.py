"""The link between a frontend process and the engine (`inferd serve --workers N`).

One Unix stream socket per frontend carries frames: a small pickled header (ids, names, shapes,
deadlines: control values, never tensors) and a body of raw tensor bytes. A tensor of at least
`shm_threshold` bytes travels through shared memory instead: the sender writes it to a new
`/dev/shm` object and sends its name; the receiver maps it, unlinks it at once (so nothing is
left behind once it is read) and reads the array in place, no copy. `scripts/measure_ipc.py`
measured both ways (docs/benchmarks.md, "Between processes"): the socket costs ~17 µs of
frontend CPU per small message, shared memory is 3-6x cheaper than the socket from a few
hundred KB up, and pickled pipes deadlock under load.

Frames written during one turn of the event loop leave in one system call, so a burst of
requests (or of answers from one batch) costs one write, not one each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import os
import pickle
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from inferd.core import errors
from inferd.core.types import Array
from inferd_wire.codec import pack_bytes_elements, unpack_bytes_elements

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # header bytes, body bytes
SHM_DIR = Path("/dev/shm")
# Tensors at least this large cross through shared memory (config `ipc_shm_threshold_bytes`).
DEFAULT_SHM_THRESHOLD = 256 * 1024

# A tensor's elements, in its spec: fixed-size, or BYTES (sent length-prefixed) read back as
# str or as bytes.
_FIXED, _STR, _BYTES = 0, 1, 2

TensorSpec = tuple[str, str, tuple[int, ...], int, int, str]
"""(name, numpy dtype, shape, elements kind, bytes, shared-memory name or "": in the body)."""


class SharedTensors:
    """Writes tensors of at least `threshold` bytes to shared memory, named
    `<run prefix><owner>-<n>` (owner: this process's pid by default), so that what a process
    left behind can be removed by prefix: by the supervisor when it dies, by the engine when a
    frontend's link drops."""

    def __init__(
        self, prefix: str, threshold: int = DEFAULT_SHM_THRESHOLD, owner: str | None = None
    ) -> None:
        self.prefix = f"{prefix}{owner or os.getpid()}-"
        self.threshold = threshold if SHM_DIR.is_dir() else 1 << 62
        self._numbers = itertools.count()

    def put(self, data: memoryview) -> str:
        """The new object's name; OSError (nothing left behind) when it cannot be made."""
        name = f"{self.prefix}{next(self._numbers)}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the pages first: a full tmpfs then fails here with ENOSPC, where writing
            # through the mapping would kill the process with SIGBUS.
            os.posix_fallocate(fd, 0, data.nbytes)
            with mmap.mmap(fd, data.nbytes) as region:
                region[:] = data
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return name


def take_shared(name: str, size: int, prefix: str) -> mmap.mmap:
    """Map the shared-memory object `name` and unlink it: the mapping lives as long as the
    arrays that view it."""
    if not name.startswith(prefix) or "/" in name:
        raise ValueError(f"shared tensor {name!r} is not one of this server's")
    path = SHM_DIR / name
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)
        os.unlink(path)


def remove_shared(prefix: str) -> int:
    """Remove every shared tensor whose name starts with `prefix` (a dead process's, or a whole
    server's at exit); returns how many."""
    removed = 0
    if not SHM_DIR.is_dir():
        return 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def pack_tensors(
    arrays: Iterable[tuple[str, Array]], shared: SharedTensors
) -> tuple[list[TensorSpec], list[memoryview]]:
    """Specs for the header and raw buffers for the body (those not in shared memory)."""
    specs: list[TensorSpec] = []
    body: list[memoryview] = []
    for name, array in arrays:
        kind = _FIXED
        if array.dtype.kind in "OSU":
            flat = array.reshape(-1)
            kind = _STR if flat.size and isinstance(flat[0], str) else _BYTES
            data = memoryview(pack_bytes_elements(flat))
        else:
            data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        shm = ""
        if data.nbytes >= shared.threshold:
            try:
                shm = shared.put(data)
            except OSError as exc:
                # /dev/shm full (a container's default is 64 MB) or refused: the socket
                # carries it instead, slower but whole.
                log.warning(
                    "shared memory refused a %d-byte tensor (%s); sent inline", data.nbytes, exc
                )
        specs.append((name, array.dtype.str, array.shape, kind, data.nbytes, shm))
        if not shm:
            body.append(data)
    return specs, body


def unpack_tensors(specs: Iterable[TensorSpec], body: bytes, prefix: str) -> dict[str, Array]:
    """The arrays `pack_tensors` sent: read-only views of the body or of shared memory. If one
    cannot be read, the frame's other shared objects are removed before the error goes up."""
    specs = list(specs)
    try:
        return _unpack(specs, body, prefix)
    except BaseException:
        for spec in specs:
            if spec[5] and spec[5].startswith(prefix) and "/" not in spec[5]:
                (SHM_DIR / spec[5]).unlink(missing_ok=True)
        raise


def _unpack(specs: list[TensorSpec], body: bytes, prefix: str) -> dict[str, Array]:
    arrays: dict[str, Array] = {}
    offset = 0
    for name, dtype, shape, kind, size, shm in specs:
        source: Any
        if shm:
            source = take_shared(shm, size, prefix)
        else:
            source = memoryview(body)[offset : offset + size]
            offset += size
        if kind == _FIXED:
            array = np.frombuffer(source, dtype=np.dtype(dtype)).reshape(shape)
            if shm:
                array.flags.writeable = False
        else:
            count = 1
            for d in shape:
                count *= d
            array = unpack_bytes_elements(bytes(source), count)
            if kind == _STR:
                array = np.array([e.decode() for e in array], dtype=object)
            array = array.reshape(shape)
        arrays[name] = array
    return arrays


class Link(asyncio.Protocol):
    """One end of the socket: `send(header, body)` out, `on_frame(header, body)` in."""

    def __init__(
        self,
        on_frame: Callable[[Any, bytes], None],
        on_lost: Callable[[Exception | None], None],
    ) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._out: list[bytes | memoryview] = []
        self._flushing = False
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_event_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._out.clear()
        self._on_lost(exc)

    @property
    def connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = len(buffer)
        offset = 0
        while size - offset >= _FRAME.size:
            header_size, body_size = _FRAME.unpack_from(buffer, offset)
            start = offset + _FRAME.size
            end = start + header_size + body_size
            if end > size:
                break
            header = pickle.loads(buffer[start : start + header_size])
            body = bytes(buffer[start + header_size : end]) if body_size else b""
            offset = end
            try:
                self._on_frame(header, body)
            except Exception:
                # One frame's failure is its request's (answered by its handler); the link and
                # every other request on it go on.
                log.exception("link: a %r frame failed", header[0] if header else None)
        if offset == size:
            buffer.clear()
        elif offset:
            del buffer[:offset]

    def send(self, header: Any, body: Iterable[bytes | memoryview] = ()) -> None:
        """Queue one frame; frames queued in one turn of the loop go out in one write."""
        if self.transport is None:
            return
        parts = list(body)
        encoded = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
        self._out.append(_FRAME.pack(len(encoded), sum(memoryview(p).nbytes for p in parts)))
        self._out.append(encoded)
        self._out.extend(parts)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing() and out:
            self.transport.writelines(out)

    def close(self) -> None:
        self._flush()
        if self.transport is not None:
            self.transport.close()


def error_of(name: str, message: str) -> errors.InferdError:
    """The core's error a frontend raises for an engine's ("error", ...) frame."""
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.InferdError)):
        cls = errors.InferenceFailed
    return cls(message)
