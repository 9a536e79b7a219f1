"""The CUDA execution path on a real GPU: provider, pinned staging, IO binding, batch buckets,
sessions per slot and CUDA graphs, each checked against the CPU provider's outputs.

Plain (sync) tests: the GPU host has pytest but not pytest-asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from inferd.core.batching.batcher import BatchingPolicy, BatchRun
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.models.registry import ModelRegistry, onnxruntime_session
from inferd.core.runtime.cuda_graphs import GraphSlot
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.core.runtime.slots import BindingSlot
from inferd.core.types import Array, InferRequest, InferResult

pytestmark = pytest.mark.gpu

CUDA_EP = "CUDAExecutionProvider"
CPU = resolve_providers(["cpu"], {})
WAIT = 120.0


def effective(config: dict[str, object]) -> EffectiveConfig:
    return EffectiveConfig.merge(ModelConfig.model_validate(config), ModelDefaults())


def cuda_session(path: Path, instances: int = 1, **config: object) -> OnnxRuntimeSession:
    merged = effective(config)
    return OnnxRuntimeSession(
        path,
        resolve_providers(["cuda", "cpu"], {}, cuda_graphs=merged.config.cuda_graphs),
        instances=instances,
        effective=merged,
    )


def cpu_session(path: Path, **config: object) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(path, CPU, effective=effective(config))


@pytest.fixture
def closing() -> Iterator[list[OnnxRuntimeSession]]:
    opened: list[OnnxRuntimeSession] = []
    yield opened
    for s in opened:
        s.close()


def batch_for(s: OnnxRuntimeSession, sizes: Sequence[int], seed: int) -> list[dict[str, Array]]:
    rng = np.random.default_rng(seed)
    spec = s.signature.inputs[0]
    return [{spec.name: rng.standard_normal((n, *spec.dims)).astype(np.float32)} for n in sizes]


def assert_matches_cpu(
    got: Sequence[dict[str, Array]],
    batch: Sequence[dict[str, Array]],
    reference: OnnxRuntimeSession,
) -> None:
    for request, outputs in zip(batch, got, strict=True):
        want = reference.run_batch([request], ()).outputs[0]
        rows = next(iter(request.values())).shape[0]
        for name, array in outputs.items():
            assert array.shape == want[name].shape and array.shape[0] == rows, name
            # TF32 convolutions on the GPU: compare against the output's scale.
            scale = float(np.abs(want[name]).max()) or 1.0
            np.testing.assert_allclose(array, want[name], rtol=1e-2, atol=1e-2 * scale)


def concurrently(
    s: OnnxRuntimeSession, batches: Sequence[list[dict[str, Array]]]
) -> list[BatchRun]:
    """Every batch submitted at once to the session's slots (sync: pytest-asyncio is not on
    the GPU host)."""

    async def run_all() -> list[BatchRun]:
        return await asyncio.wait_for(asyncio.gather(*(s.execute(b, ()) for b in batches)), WAIT)

    return asyncio.run(run_all())


def test_cuda_provider_is_active_with_pinned_staging_and_default_buckets(
    demo_models: Path, closing: list
) -> None:
    closing.append(s := cuda_session(demo_models / "cnn" / "1" / "model.onnx", max_batch_size=16))
    assert s.providers[0] == CUDA_EP
    assert s.buckets == (1, 2, 4, 8, 16)
    slot = s._slots[0]
    assert isinstance(slot, BindingSlot)
    s.run_batch(batch_for(s, [3], seed=0), ())
    assert slot.pinned, "cudaHostRegister failed: staging buffers are pageable"


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_io_binding_on_cuda_matches_cpu(demo_models: Path, closing: list, name: str) -> None:
    path = demo_models / name / "1" / "model.onnx"
    closing.append(s := cuda_session(path, max_batch_size=16))
    closing.append(reference := cpu_session(path, max_batch_size=16))
    for seed, sizes in enumerate(([1], [3], [2, 5], [16], [4, 4, 4, 4])):
        batch = batch_for(s, sizes, seed)
        assert_matches_cpu(s.run_batch(batch, ()).outputs, batch, reference)


def test_cuda_graph_replay_per_bucket_matches_cpu(demo_models: Path, closing: list) -> None:
    path = demo_models / "cnn" / "1" / "model.onnx"
    closing.append(
        s := cuda_session(
            path, instances=2, max_batch_size=8, batch_buckets=[1, 4], cuda_graphs=True
        )
    )
    closing.append(reference := cpu_session(path, max_batch_size=8))
    assert len(s._sessions) == 2
    for slot in s._slots:
        assert isinstance(slot, GraphSlot)
        assert slot.captured == 3
    for seed, sizes in enumerate(([1], [3], [2, 2], [8], [5, 1])):
        batch = batch_for(s, sizes, seed)
        assert_matches_cpu(s.run_batch(batch, ()).outputs, batch, reference)


def test_graph_slots_run_concurrently_and_stay_correct(demo_models: Path, closing: list) -> None:
    path = demo_models / "cnn" / "1" / "model.onnx"
    closing.append(
        s := cuda_session(path, instances=2, max_batch_size=8, batch_buckets=[8], cuda_graphs=True)
    )
    closing.append(reference := cpu_session(path, max_batch_size=8))
    batches = [batch_for(s, [n], seed=n) for n in (1, 2, 3, 5, 8, 7)]
    runs = concurrently(s, batches)
    for batch, run in zip(batches, runs, strict=True):
        assert_matches_cpu(run.outputs, batch, reference)


@pytest.mark.parametrize("per_instance", [False, True])
def test_four_slots_on_cuda_stay_correct(
    demo_models: Path, closing: list, per_instance: bool
) -> None:
    path = demo_models / "cnn" / "1" / "model.onnx"
    closing.append(
        s := cuda_session(path, instances=4, max_batch_size=16, session_per_instance=per_instance)
    )
    closing.append(reference := cpu_session(path, max_batch_size=16))
    assert len(s._sessions) == (4 if per_instance else 1)
    batches = [batch_for(s, [n], seed=n) for n in range(1, 17)]
    runs = concurrently(s, batches)
    for batch, run in zip(batches, runs, strict=True):
        assert_matches_cpu(run.outputs, batch, reference)


def test_warmup_sizes_cover_every_bucket_on_every_slot(demo_models: Path, closing: list) -> None:
    path = demo_models / "mlp" / "1" / "model.onnx"
    closing.append(s := cuda_session(path, instances=2, max_batch_size=8))
    assert s.warmup_batch_sizes(BatchingPolicy(max_batch_size=8, instances=2)) == [
        1,
        1,
        2,
        2,
        4,
        4,
        8,
        8,
    ]


def test_registry_serves_on_cuda_with_buckets(demo_models: Path) -> None:
    path = demo_models / "mlp" / "1" / "model.onnx"
    reference = cpu_session(path, max_batch_size=16)
    requests = [batch_for(reference, [n], seed=n)[0] for n in (1, 2, 3)]

    async def serve() -> list[InferResult]:
        registry = ModelRegistry(ModelDefaults(), session_factory=onnxruntime_session)
        config = ModelConfig(
            max_batch_size=16,
            max_queue_delay_us=50_000,
            instances=2,
            execution_providers=("cuda",),
        )
        await registry.load_version("mlp", 1, path, config)
        version = registry.resolve("mlp", 1)
        try:
            assert version.providers[0] == CUDA_EP
            return await asyncio.wait_for(
                asyncio.gather(
                    *(version.infer(InferRequest(model="mlp", inputs=r)) for r in requests)
                ),
                WAIT,
            )
        finally:
            await registry.shutdown()

    try:
        results = asyncio.run(serve())
        assert_matches_cpu([r.outputs for r in results], requests, reference)
    finally:
        reference.close()


def test_resnet50_graphs_and_io_binding_match_cpu(reference_models: Path, closing: list) -> None:
    path = reference_models / "resnet50.onnx"
    closing.append(
        graphs := cuda_session(path, max_batch_size=4, batch_buckets=[1, 4], cuda_graphs=True)
    )
    closing.append(bound := cuda_session(path, max_batch_size=4))
    closing.append(reference := cpu_session(path, max_batch_size=4))
    for sizes in ([1], [3]):
        batch = batch_for(bound, sizes, seed=sum(sizes))
        assert_matches_cpu(bound.run_batch(batch, ()).outputs, batch, reference)
        assert_matches_cpu(graphs.run_batch(batch, ()).outputs, batch, reference)
