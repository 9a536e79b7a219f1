"""The ONNX Runtime session on the CPU: batch buckets and padding, IO binding, execution slots.

Padding must never reach a client: every test compares a padded run with the same requests run
alone, unpadded, and checks each request gets exactly its own rows back."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from inferd.core.batching.batcher import BatchingPolicy
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.models.registry import ModelRegistry, onnxruntime_session
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.core.runtime.slots import BindingSlot, PlainSlot
from inferd.core.types import Array, InferRequest
from inferd.demo_models import (
    build_cnn,
    build_echo_bytes,
    build_mlp,
    build_text_encoder,
    write_model,
)

CPU = resolve_providers(["cpu"], {})
WAIT = 30.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime-models")
    write_model(build_mlp(), root, "mlp")
    write_model(build_cnn(), root, "cnn")
    write_model(build_text_encoder(), root, "text_encoder")
    write_model(build_echo_bytes(), root, "echo_bytes")
    return root


def model(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.onnx"


def session(
    repo: Path,
    name: str,
    instances: int = 1,
    io_binding: bool | None = None,
    **config: object,
) -> OnnxRuntimeSession:
    return OnnxRuntimeSession(
        model(repo, name),
        CPU,
        instances=instances,
        effective=EffectiveConfig.merge(ModelConfig.model_validate(config), ModelDefaults()),
        io_binding=io_binding,
    )


@pytest.fixture
def closing() -> Iterator[list[OnnxRuntimeSession]]:
    opened: list[OnnxRuntimeSession] = []
    yield opened
    for s in opened:
        s.close()


def mlp_request(rows: int, seed: int) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((rows, 64)).astype(np.float32)}


def alone(reference: OnnxRuntimeSession, request: Mapping[str, Array]) -> dict[str, Array]:
    """The request run by itself, unpadded."""
    return reference.run_batch([request], ()).outputs[0]


def assert_each_request_gets_its_own_rows(
    batch: Sequence[Mapping[str, Array]],
    outputs: Sequence[Mapping[str, Array]],
    reference: OnnxRuntimeSession,
) -> None:
    assert len(outputs) == len(batch)
    for request, got in zip(batch, outputs, strict=True):
        rows = next(iter(request.values())).shape[0]
        want = alone(reference, request)
        assert set(got) == set(want)
        for name, array in got.items():
            # Exactly the request's rows: one padding row too many fails here.
            assert array.shape == want[name].shape, name
            assert array.shape[0] == rows
            if array.dtype == object:
                assert array.tolist() == want[name].tolist()
            else:
                np.testing.assert_allclose(array, want[name], rtol=1e-5, atol=1e-6)


# -- buckets and padding -----------------------------------------------------------------------


def test_cpu_has_no_buckets_unless_configured(repo: Path, closing: list) -> None:
    closing.append(plain := session(repo, "mlp", max_batch_size=16))
    assert plain.buckets == ()
    closing.append(bucketed := session(repo, "mlp", max_batch_size=16, batch_buckets=[4, 8]))
    assert bucketed.buckets == (4, 8, 16)


def test_batch_is_padded_to_its_bucket_and_padding_never_reaches_a_request(
    repo: Path, closing: list
) -> None:
    closing.append(reference := session(repo, "mlp", max_batch_size=16))
    closing.append(bucketed := session(repo, "mlp", max_batch_size=16, batch_buckets=[4, 8]))
    executed: list[int] = []
    slot = bucketed._slots[0]
    original = slot.run

    def spy(feeds: Mapping[str, Array], names: Sequence[str]) -> list[Array]:
        executed.append(feeds["input"].shape[0])
        return original(feeds, names)

    slot.run = spy  # type: ignore[method-assign]
    for sizes in ([2, 1], [3], [1, 1, 1, 1, 1], [4, 4, 4]):
        batch = [mlp_request(n, seed=i) for i, n in enumerate(sizes)]
        run = bucketed.run_batch(batch, ())
        assert_each_request_gets_its_own_rows(batch, run.outputs, reference)
    assert executed == [4, 4, 8, 16]


def test_padding_rows_are_zeros_after_the_real_rows(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=8, batch_buckets=[8]))
    first, second = mlp_request(2, seed=1), mlp_request(3, seed=2)
    # A previous, larger batch leaves non-zero rows in the slot's staging buffer.
    s.run_batch([mlp_request(8, seed=3)], ())
    feeds = s._slots[0].stage([first, second], 8)
    staged = feeds["input"]
    assert staged.shape == (8, 64)
    np.testing.assert_array_equal(staged[:2], first["input"])
    np.testing.assert_array_equal(staged[2:5], second["input"])
    assert not staged[5:].any()


def test_only_requested_outputs_come_back_sliced(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=8, batch_buckets=[8]))
    run = s.run_batch([mlp_request(3, seed=1)], ["probabilities"])
    assert list(run.outputs[0]) == ["probabilities"]
    assert run.outputs[0]["probabilities"].shape == (3, 10)


def test_string_model_is_padded_with_empty_strings_and_sliced(repo: Path, closing: list) -> None:
    closing.append(reference := session(repo, "echo_bytes", max_batch_size=8))
    closing.append(s := session(repo, "echo_bytes", max_batch_size=8, batch_buckets=[4, 8]))
    assert isinstance(s._slots[0], PlainSlot)
    batch = [
        {"text": np.array(["a", "bb"], dtype=object)},
        {"text": np.array(["ccc"], dtype=object)},
    ]
    run = s.run_batch(batch, ())
    assert [o["echo"].tolist() for o in run.outputs] == [["a", "bb"], ["ccc"]]
    assert_each_request_gets_its_own_rows(batch, run.outputs, reference)


def test_two_input_model_with_variable_sequence_pads_every_input(repo: Path, closing: list) -> None:
    closing.append(reference := session(repo, "text_encoder", max_batch_size=8))
    closing.append(s := session(repo, "text_encoder", max_batch_size=8, batch_buckets=[4]))
    rng = np.random.default_rng(0)

    def request(rows: int, seq: int) -> dict[str, Array]:
        return {
            "input_ids": rng.integers(0, 1000, (rows, seq)).astype(np.int64),
            "attention_mask": np.ones((rows, seq), dtype=np.int64),
        }

    for batch in ([request(1, 7), request(2, 7)], [request(5, 3)], [request(1, 12)]):
        assert_each_request_gets_its_own_rows(batch, s.run_batch(batch, ()).outputs, reference)


@pytest.mark.parametrize("io_binding", [None, True])
def test_close_releases_the_onnxruntime_sessions_while_the_object_lives(
    repo: Path, io_binding: bool | None
) -> None:
    """An unloaded version keeps its (closed) session object: closing must free the ONNX
    Runtime sessions and buffers now, not when the object is dropped."""
    s = session(repo, "mlp", instances=2, io_binding=io_binding, session_per_instance=True)
    s.run_batch([mlp_request(2, seed=1)], ())
    released = [weakref.ref(ort_session) for ort_session in s._sessions]
    assert len(released) == 2
    s.close()
    gc.collect()
    assert s.closed
    assert [ref() for ref in released] == [None, None]


def test_a_slots_next_batch_does_not_change_earlier_results(repo: Path, closing: list) -> None:
    """Staging buffers are reused batch after batch: results must never be views of them."""
    closing.append(s := session(repo, "mlp", max_batch_size=8, batch_buckets=[8]))
    first = s.run_batch([mlp_request(2, seed=1), mlp_request(3, seed=2)], ())
    kept = [{k: v.copy() for k, v in o.items()} for o in first.outputs]
    s.run_batch([mlp_request(8, seed=9)], ())
    for got, want in zip(first.outputs, kept, strict=True):
        np.testing.assert_array_equal(got["probabilities"], want["probabilities"])


async def test_padding_never_leaks_through_the_registry(repo: Path) -> None:
    """Concurrent requests batched together by the real batcher, padded to a bucket."""
    registry = ModelRegistry(ModelDefaults(), session_factory=onnxruntime_session)
    config = ModelConfig(
        max_batch_size=16, batch_buckets=(16,), max_queue_delay_us=200_000, instances=1
    )
    await registry.load_version("mlp", 1, model(repo, "mlp"), config)
    version = registry.resolve("mlp", 1)
    reference = session(repo, "mlp", max_batch_size=16)
    try:
        requests = [mlp_request(n, seed=n) for n in (1, 2, 3)]
        results = await asyncio.wait_for(
            asyncio.gather(*(version.infer(InferRequest(model="mlp", inputs=r)) for r in requests)),
            WAIT,
        )
        assert [r.batch_rows for r in results] == [6, 6, 6]
        assert_each_request_gets_its_own_rows(requests, [r.outputs for r in results], reference)
    finally:
        reference.close()
        await registry.shutdown()


# -- IO binding on the CPU -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_io_binding_gives_the_same_outputs_as_run(repo: Path, closing: list, name: str) -> None:
    closing.append(reference := session(repo, name, max_batch_size=8))
    closing.append(bound := session(repo, name, max_batch_size=8, io_binding=True))
    closing.append(
        padded := session(repo, name, max_batch_size=8, io_binding=True, batch_buckets=[4])
    )
    assert isinstance(bound._slots[0], BindingSlot)
    rng = np.random.default_rng(5)
    spec = bound.signature.inputs[0]
    for sizes in ([1], [2, 1], [3, 4]):
        batch = [
            {spec.name: rng.standard_normal((n, *spec.dims)).astype(np.float32)} for n in sizes
        ]
        for s in (bound, padded):
            assert_each_request_gets_its_own_rows(batch, s.run_batch(batch, ()).outputs, reference)


def test_io_binding_results_survive_the_next_batch(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=8, io_binding=True))
    first = s.run_batch([mlp_request(4, seed=1)], ())
    kept = first.outputs[0]["probabilities"].copy()
    s.run_batch([mlp_request(4, seed=2)], ())
    np.testing.assert_array_equal(first.outputs[0]["probabilities"], kept)


def test_io_binding_is_off_on_cpu_by_default_and_for_strings(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=8))
    assert isinstance(s._slots[0], PlainSlot)
    closing.append(t := session(repo, "echo_bytes", max_batch_size=8, io_binding=True))
    assert isinstance(t._slots[0], PlainSlot)


# -- execution slots ---------------------------------------------------------------------------


def test_slots_share_one_session_unless_asked_for_one_each(repo: Path, closing: list) -> None:
    closing.append(shared := session(repo, "mlp", instances=3, max_batch_size=8))
    assert len(shared._sessions) == 1
    assert len({id(slot.session) for slot in shared._slots}) == 1
    closing.append(
        own := session(repo, "mlp", instances=3, max_batch_size=8, session_per_instance=True)
    )
    assert len(own._sessions) == 3
    assert len({id(slot.session) for slot in own._slots}) == 3


def _gate_runs(s: OnnxRuntimeSession, barrier: threading.Barrier) -> None:
    """Every slot's run waits at `barrier` before running: only as many runs at once as the
    barrier's parties get through."""
    for slot in s._slots:
        original = slot.run

        def gated(
            feeds: Mapping[str, Array],
            names: Sequence[str],
            original: object = original,
        ) -> list[Array]:
            barrier.wait(timeout=WAIT)
            return original(feeds, names)  # type: ignore[operator,no-any-return]

        slot.run = gated  # type: ignore[method-assign]


@pytest.mark.parametrize("per_instance", [False, True])
async def test_two_slots_run_two_batches_at_once(
    repo: Path, closing: list, per_instance: bool
) -> None:
    closing.append(
        s := session(repo, "mlp", instances=2, max_batch_size=8, session_per_instance=per_instance)
    )
    # Both runs must be inside `run` together to pass the barrier: one slot would deadlock.
    _gate_runs(s, threading.Barrier(2))
    runs = await asyncio.wait_for(
        asyncio.gather(
            s.execute([mlp_request(2, seed=1)], ()), s.execute([mlp_request(3, seed=2)], ())
        ),
        WAIT,
    )
    assert [r.outputs[0]["probabilities"].shape[0] for r in runs] == [2, 3]


async def test_one_slot_runs_one_batch_at_a_time(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", instances=1, max_batch_size=8))
    inside = threading.Semaphore(0)
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()
    original = s._slots[0].run

    def slow(feeds: Mapping[str, Array], names: Sequence[str]) -> list[Array]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        inside.release()
        release.wait(WAIT)
        try:
            return original(feeds, names)
        finally:
            with lock:
                running -= 1

    s._slots[0].run = slow  # type: ignore[method-assign]
    both = asyncio.gather(
        s.execute([mlp_request(1, seed=1)], ()), s.execute([mlp_request(1, seed=2)], ())
    )
    assert await asyncio.to_thread(inside.acquire, True, WAIT)
    # The second batch cannot start while the first holds the only slot.
    assert not await asyncio.to_thread(inside.acquire, True, 0.2)
    release.set()
    await asyncio.wait_for(both, WAIT)
    assert most == 1


# -- warm-up sizes ---------------------------------------------------------------------------


def test_warmup_runs_every_bucket(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=16, batch_buckets=[1, 4]))
    policy = BatchingPolicy(max_batch_size=16, preferred_batch_sizes=(8,))
    assert s.warmup_batch_sizes(policy) == [1, 4, 16]


def test_warmup_without_buckets_runs_one_preferred_and_max(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=16))
    policy = BatchingPolicy(max_batch_size=16, preferred_batch_sizes=(8,))
    assert s.warmup_batch_sizes(policy) == [1, 8, 16]


def test_warmup_visits_every_slot_that_has_its_own_session(repo: Path, closing: list) -> None:
    closing.append(
        s := session(
            repo,
            "mlp",
            instances=2,
            max_batch_size=4,
            batch_buckets=[2],
            session_per_instance=True,
        )
    )
    policy = BatchingPolicy(max_batch_size=4, instances=2)
    sizes = s.warmup_batch_sizes(policy)
    assert sizes == [2, 2, 4, 4]
    seen: list[tuple[int, int]] = []
    for slot in s._slots:
        original = slot.run

        def spy(
            feeds: Mapping[str, Array],
            names: Sequence[str],
            original: object = original,
            slot: object = slot,
        ) -> list[Array]:
            seen.append((id(slot), feeds["input"].shape[0]))
            return original(feeds, names)  # type: ignore[operator,no-any-return]

        slot.run = spy  # type: ignore[method-assign]
    for rows in sizes:
        s.run_batch([mlp_request(rows, seed=rows)], ())
    # Sequential runs take the slots in turn: each slot ran each size.
    assert sorted(seen) == sorted({(id(slot), n) for slot in s._slots for n in (2, 4)})


def test_cuda_graphs_are_ignored_on_cpu(repo: Path, closing: list) -> None:
    closing.append(s := session(repo, "mlp", max_batch_size=8, cuda_graphs=True))
    assert isinstance(s._slots[0], PlainSlot)
    assert s.providers == ("CPUExecutionProvider",)


# -- ONNX Runtime's own logging ----------------------------------------------------------------

# Runs in a child process: ONNX Runtime writes its log lines to fd 2 from C++, out of reach of
# pytest's capture. The child logs as the server does (JSON), runs two models that fail inside
# the graph on both slot kinds, prints what each raised on stdout and logs it (as the batcher
# does), and issues a Python-level warning.
_FAILING_RUNS = """
import json, logging, sys, warnings
from pathlib import Path
import numpy as np
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.observability.logging import configure_logging

configure_logging("INFO", "json")
gather, add = Path(sys.argv[1]), Path(sys.argv[2])
runs = [
    (gather, {"ids": np.array([1, 7], dtype=np.int64)}),
    (add, {"x": np.ones((2, 3), dtype=np.float32)}),
]
effective = EffectiveConfig.merge(ModelConfig(), ModelDefaults())
for path, feeds in runs:
    for io_binding in (None, True):
        session = OnnxRuntimeSession(
            path, resolve_providers(["cpu"], {}), 1, effective=effective, io_binding=io_binding
        )
        try:
            session.run_batch([feeds], ())
        except Exception as exc:
            print(json.dumps({"model": path.parent.parent.name, "raised": str(exc)}), flush=True)
            logging.getLogger("inferd.test").error("batch failed: %s", exc)
        else:
            print(json.dumps({"model": path.parent.parent.name, "raised": None}), flush=True)
        session.close()
warnings.warn("a Python-level warning")
"""


def _save(model: onnx.ModelProto, root: Path, name: str) -> Path:
    model.ir_version = 10
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, path)
    return path


def test_onnxruntime_writes_nothing_raw_to_stderr_when_a_run_fails(tmp_path: Path) -> None:
    opset = [helper.make_opsetid("", 17)]
    table = helper.make_tensor("table", TensorProto.FLOAT, [4, 2], [0.0] * 8)
    gather = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 2])],
        initializer=[table],
    )
    # x's second dim is free in the graph, so only the run finds it does not broadcast with 4.
    bias = helper.make_tensor("bias", TensorProto.FLOAT, [4], [1.0] * 4)
    add = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
        initializer=[bias],
    )
    paths = [
        _save(helper.make_model(gather, opset_imports=opset), tmp_path, "gather"),
        _save(helper.make_model(add, opset_imports=opset), tmp_path, "add"),
    ]
    child = subprocess.run(
        [sys.executable, "-c", _FAILING_RUNS, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    raised = [json.loads(line) for line in child.stdout.splitlines()]
    # The error still reaches the caller, from either slot kind.
    assert [r["model"] for r in raised] == ["gather", "gather", "add", "add"]
    assert all("out of data bounds" in r["raised"] for r in raised[:2]), raised
    assert all("broadcast" in r["raised"] for r in raised[2:]), raised
    assert "\x1b[" not in child.stderr
    assert "[E:onnxruntime" not in child.stderr
    # What is on stderr is inferd's JSON log only: the four failures and the warning.
    records = [json.loads(line) for line in child.stderr.splitlines() if line.strip()]
    assert [r["logger"] for r in records] == ["inferd.test"] * 4 + ["py.warnings"]
