"""The frontend-engine link of `--workers N` (server/inferd/workers/ipc.py), the frontend's
routing table (frontend.py) and the metrics copy (observability/worker_metrics.py), without
processes: a socket pair, fake routes, plain collectors."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inferd.core.errors import InferenceFailed, ModelNotFound, QueueFull, Unavailable
from inferd.core.types import ModelSignature, TensorSpec
from inferd.observability.worker_metrics import CollectorMirror
from inferd.workers.frontend import EngineClient, Refusals, RemoteRegistry
from inferd.workers.ipc import (
    SHM_DIR,
    Link,
    SharedTensors,
    error_of,
    pack_tensors,
    remove_shared,
    take_shared,
    unpack_tensors,
)
from inferd.workers.layout import RunLayout

needs_shm = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def _prefix() -> str:
    return f"inferd-test-{os.getpid()}-"


def _round_trip(arrays: dict[str, np.ndarray], threshold: int = 1 << 30) -> dict[str, np.ndarray]:
    shared = SharedTensors(_prefix(), threshold)
    specs, body = pack_tensors(arrays.items(), shared)
    return unpack_tensors(specs, b"".join(bytes(b) for b in body), _prefix())


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([[True, False]]),
        np.arange(6, dtype=np.float16).reshape(2, 3),
        np.zeros((0, 5), dtype=np.int64),
        np.array(3.5, dtype=np.float64),
        np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2],  # not contiguous
    ],
    ids=["fp32", "bool", "fp16", "empty", "scalar", "strided"],
)
def test_fixed_size_tensors_cross_unchanged(array: np.ndarray) -> None:
    out = _round_trip({"x": array})["x"]
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_bytes_elements_keep_their_type() -> None:
    texts = np.array(["héllo", "", "wörld"], dtype=object).reshape(3, 1)
    raw = np.array([b"\x00\xff", b"abc"], dtype=object)
    out = _round_trip({"t": texts, "r": raw})
    assert out["t"].shape == (3, 1) and [type(e) for e in out["t"].reshape(-1)] == [str] * 3
    assert out["t"].reshape(-1).tolist() == ["héllo", "", "wörld"]
    assert out["r"].tolist() == [b"\x00\xff", b"abc"]


@needs_shm
def test_a_large_tensor_crosses_through_shared_memory_and_leaves_nothing() -> None:
    array = np.random.default_rng(0).random((256, 300)).astype(np.float32)
    shared = SharedTensors(_prefix(), threshold=64 * 1024)
    specs, body = pack_tensors([("big", array), ("small", array[:2])], shared)
    # Only the small one travels in the body; the big one is a /dev/shm object until read.
    assert sum(memoryview(b).nbytes for b in body) == array[:2].nbytes
    names = [spec[5] for spec in specs if spec[5]]
    assert len(names) == 1 and (SHM_DIR / names[0]).exists()
    out = unpack_tensors(specs, b"".join(bytes(b) for b in body), _prefix())
    assert not (SHM_DIR / names[0]).exists()
    np.testing.assert_array_equal(out["big"], array)
    np.testing.assert_array_equal(out["small"], array[:2])
    assert not out["big"].flags.writeable


@needs_shm
def test_only_this_servers_shared_tensors_are_opened() -> None:
    with pytest.raises(ValueError, match="not one of this server's"):
        take_shared("someone-else-1", 8, _prefix())
    with pytest.raises(ValueError):
        take_shared(_prefix() + "../../etc/passwd", 8, _prefix())


@needs_shm
def test_a_dead_processs_shared_tensors_are_removed() -> None:
    shared = SharedTensors(_prefix(), threshold=1)
    shared.put(memoryview(b"12345678"))
    shared.put(memoryview(b"abcdefgh"))
    assert remove_shared(shared.prefix) == 2
    assert not list(SHM_DIR.glob(f"{shared.prefix}*"))


async def _linked_pair() -> tuple[Link, Link, list[tuple[Any, bytes]], list[tuple[Any, bytes]]]:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    got_a: list[tuple[Any, bytes]] = []
    got_b: list[tuple[Any, bytes]] = []
    _, a = await loop.create_unix_connection(
        lambda: Link(lambda h, b: got_a.append((h, b)), lambda e: None), sock=left
    )
    _, b = await loop.create_unix_connection(
        lambda: Link(lambda h, b: got_b.append((h, b)), lambda e: None), sock=right
    )
    return a, b, got_a, got_b


async def _until(condition: Any) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not met")


async def test_frames_arrive_whole_and_in_order_however_the_stream_splits() -> None:
    a, b, _, got_b = await _linked_pair()
    big = os.urandom(3 * 1024 * 1024)
    for i in range(50):
        a.send(("n", i), [memoryview(bytes([i]) * i)])
    a.send(("big",), [big[:10], memoryview(big)[10:]])
    a.send(("empty",))
    await _until(lambda: len(got_b) == 52)
    assert [h for h, _ in got_b[:50]] == [("n", i) for i in range(50)]
    assert all(body == bytes([i]) * i for i, (_, body) in enumerate(got_b[:50]))
    assert got_b[50] == (("big",), big)
    assert got_b[51] == (("empty",), b"")
    a.close()
    b.close()


async def test_frames_sent_in_one_turn_of_the_loop_leave_in_one_write() -> None:
    a, b, _, got_b = await _linked_pair()
    writes: list[int] = []
    transport = a.transport
    assert transport is not None
    original = transport.writelines

    def counting(parts: Any) -> None:
        writes.append(len(parts))
        original(parts)

    transport.writelines = counting  # type: ignore[method-assign]
    for i in range(20):
        a.send(("n", i))
    await _until(lambda: len(got_b) == 20)
    assert len(writes) == 1
    a.close()
    b.close()


def _signature() -> ModelSignature:
    spec = TensorSpec("x", "FP32", (4,))
    return ModelSignature((spec,), (TensorSpec("y", "FP32", (4,)),), max_batch_size=8)


async def test_the_frontend_routes_as_the_engine_says(tmp_path: Path) -> None:
    client = EngineClient(RunLayout(tmp_path, _prefix()), 1 << 20, 0)
    registry: RemoteRegistry = client.registry
    client.accepting = True
    registry.update({"m": [(1, _signature(), None, 7), (3, _signature(), 2.0, 9)], "empty": []})
    newest = registry.resolve("m")
    assert newest.version == 3 and newest.requested is None and newest.default_timeout == 2.0
    assert newest.generation == 9
    named = registry.resolve("m", 1)
    assert named.version == 1 and named.requested == 1
    with pytest.raises(ModelNotFound, match="version 2 is not READY; ready versions: \\[1, 3\\]"):
        registry.resolve("m", 2)
    with pytest.raises(ModelNotFound, match="no READY version"):
        registry.resolve("empty")
    with pytest.raises(ModelNotFound, match="not served"):
        registry.resolve("other")
    assert registry.knows("empty") and not registry.knows("other")
    client.accepting = False
    with pytest.raises(Unavailable, match="engine is not available"):
        registry.resolve("m")
    client.accepting = True
    await registry.shutdown()  # nothing in flight: returns at once
    with pytest.raises(Unavailable, match="shutting down"):
        registry.resolve("m")


def test_a_draining_frontend_sees_every_frontends_last_refusal(tmp_path: Path) -> None:
    first, second = Refusals(tmp_path / "r", 0), Refusals(tmp_path / "r", 1)
    assert first.last == second.last == 0.0
    second.refused(12.5)
    first.refused(7.0)
    assert first.last == second.last == 12.5


class _Figures:
    def __init__(self) -> None:
        self.in_use = 10.0
        self.refused = 0.0

    def collect(self) -> Any:
        yield GaugeMetricFamily("t_bytes", "bytes held", value=self.in_use)
        counter = CounterMetricFamily("t_refusals", "refused", labels=("why",))
        counter.add_metric(("full",), self.refused)
        yield counter


def test_the_mirror_copies_gauges_and_adds_counter_increments() -> None:
    figures = _Figures()
    mirror = CollectorMirror([figures])
    mirror.update()
    figures.in_use, figures.refused = 4.0, 3.0
    mirror.update()
    mirror.update()  # no change: nothing added twice
    figures.refused = 5.0
    mirror.update()
    text = generate_latest(mirror.registry).decode()
    assert "t_bytes 4.0" in text
    assert 't_refusals_total{why="full"} 5.0' in text


def test_an_engine_error_becomes_the_same_core_error_in_the_frontend() -> None:
    assert isinstance(error_of("QueueFull", "full"), QueueFull)
    assert error_of("QueueFull", "full").message == "full"
    # Anything that is not one of the core's errors is an inference failure (INTERNAL).
    assert type(error_of("ValueError", "x")) is InferenceFailed
    assert type(error_of("__builtins__", "x")) is InferenceFailed


@needs_shm
def test_a_tensor_that_shared_memory_refuses_travels_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full /dev/shm (ENOSPC from posix_fallocate) must not lose the request or kill the
    process: the socket carries the tensor instead."""

    def full(fd: int, offset: int, size: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    shared = SharedTensors(_prefix(), threshold=1024)
    array = np.arange(4096, dtype=np.float32)
    specs, body = pack_tensors([("big", array)], shared)
    assert specs[0][5] == "" and not list(SHM_DIR.glob(f"{shared.prefix}*"))
    out = unpack_tensors(specs, b"".join(bytes(b) for b in body), _prefix())
    np.testing.assert_array_equal(out["big"], array)


@needs_shm
def test_a_frame_that_cannot_be_read_leaves_no_shared_memory() -> None:
    shared = SharedTensors(_prefix(), threshold=1024)
    good = np.zeros(2048, dtype=np.float32)
    specs, body = pack_tensors([("a", good), ("b", good)], shared)
    names = [spec[5] for spec in specs]
    (SHM_DIR / names[0]).unlink()  # the first is gone: reading the frame fails
    with pytest.raises(FileNotFoundError):
        unpack_tensors(specs, b"".join(bytes(b) for b in body), _prefix())
    assert not (SHM_DIR / names[1]).exists()
