"""The CUDA-graph slot's code path, the capture gate and the staging buffers, on the CPU.

ONNX Runtime's CPU provider ignores `gpu_graph_id`, so a GraphSlot bound to "cpu" runs the same
fixed buffers, bindings and run options as on CUDA, without capturing: CI covers that code.
The capture itself is checked on the device (tests/gpu)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from inferd.core.runtime import cuda_graphs
from inferd.core.runtime import staging as staging_module
from inferd.core.runtime.cuda_graphs import CaptureGate, GraphSlot
from inferd.core.runtime.staging import HostStaging, StagingBuffer
from inferd.core.types import Array
from inferd.demo_models import build_mlp, write_model

WAIT = 30.0


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(build_mlp(), tmp_path_factory.mktemp("graph-models"), "mlp")


@pytest.fixture
def mlp_session(mlp_path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(mlp_path), providers=["CPUExecutionProvider"])


@pytest.fixture
def slot(mlp_session: ort.InferenceSession) -> Iterator[GraphSlot]:
    s = GraphSlot(mlp_session, "cpu", gate=CaptureGate())
    yield s
    s.close()


def rows(n: int, seed: int) -> dict[str, Array]:
    return {"input": np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)}


def zeros(n: int) -> dict[str, Array]:
    return {"input": np.zeros((n, 64), dtype=np.float32)}


def test_captured_bucket_replays_with_new_inputs(
    slot: GraphSlot, mlp_session: ort.InferenceSession
) -> None:
    slot.capture(zeros(4))
    slot.capture(zeros(8))
    assert slot.captured == 2
    for seed, n in enumerate((4, 8, 4)):
        feeds = slot.stage([rows(n, seed)], n)
        got = slot.run(feeds, ["probabilities"])
        want = mlp_session.run(["probabilities"], dict(feeds))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_replayed_outputs_are_copies_not_the_buckets_buffers(slot: GraphSlot) -> None:
    slot.capture(zeros(4))
    first = slot.run(slot.stage([rows(4, 1)], 4), ["probabilities"])[0]
    kept = first.copy()
    slot.run(slot.stage([rows(4, 2)], 4), ["probabilities"])
    np.testing.assert_array_equal(first, kept)


def test_shape_without_a_graph_runs_without_one(
    slot: GraphSlot, mlp_session: ort.InferenceSession
) -> None:
    slot.capture(zeros(4))
    feeds = slot.stage([rows(2, 3), rows(1, 4)], 3)
    got = slot.run(feeds, ["probabilities"])
    want = mlp_session.run(["probabilities"], dict(feeds))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert slot.captured == 1


def test_capturing_a_bucket_twice_keeps_the_first(slot: GraphSlot) -> None:
    slot.capture(zeros(4))
    slot.capture(zeros(4))
    assert slot.captured == 1


def test_replay_that_differs_from_a_plain_run_fails_the_capture(
    slot: GraphSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = cuda_graphs._BucketGraph.replay

    def corrupted(
        self: cuda_graphs._BucketGraph, session: ort.InferenceSession, feeds: dict[str, Array]
    ) -> dict[str, Array]:
        return {k: v + 1 for k, v in real(self, session, feeds).items()}

    monkeypatch.setattr(cuda_graphs._BucketGraph, "replay", corrupted)
    with pytest.raises(RuntimeError, match="replay of output 'probabilities' differs"):
        slot.capture(zeros(2))
    assert slot.captured == 0


def test_each_bucket_gets_its_own_graph_id(slot: GraphSlot) -> None:
    for n in (1, 2, 4):
        slot.capture(zeros(n))
    ids = sorted(g.graph_id for g in slot._graphs.values())
    assert ids == [1, 2, 3]
    for graph in slot._graphs.values():
        assert graph.run_options.get_run_config_entry("gpu_graph_id") == str(graph.graph_id)


# -- the capture gate -----------------------------------------------------------------------


def test_capture_waits_for_running_uses_and_holds_new_ones() -> None:
    gate = CaptureGate()
    events: list[str] = []
    using = threading.Event()
    finish_use = threading.Event()
    capturing = threading.Event()

    def user() -> None:
        with gate.use():
            events.append("use-start")
            using.set()
            finish_use.wait(WAIT)
            events.append("use-end")

    def capturer() -> None:
        with gate.capture():
            events.append("capture-start")
            capturing.set()
            time.sleep(0.05)
            events.append("capture-end")

    def late_user() -> None:
        with gate.use():
            events.append("late-use")

    first = threading.Thread(target=user)
    first.start()
    assert using.wait(WAIT)
    cap = threading.Thread(target=capturer)
    cap.start()
    time.sleep(0.05)
    # The capture waits for the running use; a new use queues behind the capture.
    assert not capturing.is_set()
    late = threading.Thread(target=late_user)
    late.start()
    time.sleep(0.05)
    assert events == ["use-start"]
    finish_use.set()
    for t in (first, cap, late):
        t.join(WAIT)
    assert events == ["use-start", "use-end", "capture-start", "capture-end", "late-use"]


def test_uses_run_concurrently() -> None:
    gate = CaptureGate()
    barrier = threading.Barrier(3)

    def user() -> None:
        with gate.use():
            barrier.wait(WAIT)

    threads = [threading.Thread(target=user) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not barrier.broken


# -- staging buffers ---------------------------------------------------------------------------


def test_staging_concatenates_pads_and_reuses_its_buffer() -> None:
    staging = HostStaging(pinned=False)
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    b = np.arange(6, 10, dtype=np.float32).reshape(2, 2)
    out = staging.concatenate("x", [a, b], 8)
    assert out.shape == (8, 2) and out.flags.c_contiguous
    np.testing.assert_array_equal(out[:5], np.concatenate([a, b]))
    assert not out[5:].any()
    again = staging.concatenate("x", [b], 2)
    assert again.ctypes.data == out.ctypes.data


def test_staging_grows_for_a_larger_batch() -> None:
    buffer = StagingBuffer(pinned=False)
    small = buffer.view((2, 4), np.dtype(np.float32))
    assert buffer.capacity == 32
    large = buffer.view((16, 4), np.dtype(np.int64))
    assert large.shape == (16, 4) and buffer.capacity == 512
    assert small.shape == (2, 4)
    assert large.ctypes.data % 4096 == 0


def test_staging_stays_pageable_where_cuda_cannot_pin(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(staging_module, "_cudart", lambda: None)
    staging_module._log_unpinned_once.cache_clear()
    staging = HostStaging(pinned=True)
    out = staging.concatenate("x", [np.ones((2, 3), dtype=np.float32)], 4)
    assert out[:2].all() and not out[2:].any()
    assert not staging.pinned
    assert "staging buffers stay pageable" in caplog.text


class FakeCudart:
    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.registered: dict[int, int] = {}

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        if self.status == 0:
            self.registered[ptr] = size
        return self.status

    def cudaHostUnregister(self, ptr: int) -> int:
        del self.registered[ptr]
        return 0


def test_staging_pins_each_buffer_and_unpins_what_it_replaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeCudart()
    monkeypatch.setattr(staging_module, "_cudart", lambda: fake)
    buffer = StagingBuffer(pinned=True)
    buffer.view((4,), np.dtype(np.float32))
    assert buffer.pinned and list(fake.registered.values()) == [16]
    buffer.view((64,), np.dtype(np.float32))
    assert list(fake.registered.values()) == [256]
    buffer.release()
    assert fake.registered == {}


def test_failed_registration_leaves_the_buffer_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging_module, "_cudart", lambda: FakeCudart(status=2))
    buffer = StagingBuffer(pinned=True)
    view = buffer.view((4,), np.dtype(np.float32))
    view[:] = 1
    assert not buffer.pinned


def test_padding_reads_zeros_whatever_earlier_batches_wrote() -> None:
    staging = HostStaging(pinned=False)
    rng = np.random.default_rng(0)

    def data(n: int, width: int = 4) -> Array:
        return rng.uniform(1, 2, (n, width)).astype(np.float32)

    # (real rows, bucket, row width): larger batches, smaller ones, and another row width
    # over the same bytes.
    for real, rows, width in [(8, 8, 4), (1, 2, 4), (3, 8, 4), (2, 16, 4), (5, 8, 2), (1, 4, 8)]:
        part = data(real, width)
        out = staging.concatenate("x", [part], rows)
        np.testing.assert_array_equal(out[:real], part)
        assert not out[real:].any(), (real, rows, width)
