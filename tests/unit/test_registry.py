"""The model registry with the real demo models and the real ONNX Runtime session factory (CPU):
loading, version policies, failures, routing, status watching and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from inferd.core.batching.policy import BatchingPolicy
from inferd.core.errors import InvalidInput, ModelNotFound, Unavailable
from inferd.core.models import signature as signature_module
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.models.control import ControlMode, ModelController
from inferd.core.models.registry import (
    LoadedVersion,
    ModelRegistry,
    ModelSession,
    ModelStatusEvent,
    onnxruntime_session,
)
from inferd.core.models.repository import ModelRepository
from inferd.core.observer import Observer
from inferd.core.runtime.session import OnnxRuntimeSession
from inferd.core.types import InferRequest, ModelSignature, ModelState, TensorSpec
from inferd.demo_models import IR_VERSION, MLP_CONFIG, build_echo_bytes, build_mlp, write_model

# Real threads run here (session loading, ORT): bound every wait in real seconds.
WAIT = 30.0


class QueueDepthReached(Observer):
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.reached = asyncio.Event()

    def queue_depth_changed(self, model: str, version: int, depth: int) -> None:
        if depth >= self.depth:
            self.reached.set()


class StateLog(Observer):
    def __init__(self) -> None:
        self.changes: list[tuple[str, int, ModelState, float | None]] = []
        self.loading = asyncio.Event()

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        self.changes.append((model, version, state, load_time))
        if state is ModelState.LOADING:
            self.loading.set()


def mlp_input(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def mlp_request(rows: int = 1, seed: int = 0) -> InferRequest:
    return InferRequest(model="mlp", inputs={"input": mlp_input(rows, seed)})


def fixed_shape_model() -> onnx.ModelProto:
    """Identity on a FP32 [2, 3] tensor: dim 0 is fixed, so it is not a batch dim."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


async def loaded(root: Path, observer: Observer | None = None) -> ModelRegistry:
    registry = ModelRegistry(observer=observer)
    async with asyncio.timeout(WAIT):
        await ModelController(registry, ModelRepository(root)).start()
    return registry


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[ModelRegistry]:
    """mlp (version 1, with the demo config) and echo_bytes (version 1), loaded."""
    write_model(build_mlp(), tmp_path, "mlp", 1, MLP_CONFIG)
    write_model(build_echo_bytes(), tmp_path, "echo_bytes", 1)
    reg = await loaded(tmp_path)
    yield reg
    if reg.accepting:
        await reg.shutdown()


@contextlib.asynccontextmanager
async def watching(
    registry: ModelRegistry, model: str = ""
) -> AsyncIterator[AsyncIterator[ModelStatusEvent]]:
    """registry.watch(), closed on exit so that its subscription ends with the test."""
    stream = registry.watch(model)
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def states(registry: ModelRegistry, name: str) -> dict[int, ModelState]:
    return {v.version: v.state for v in registry.versions(name)}


# -- loading ---------------------------------------------------------------------------------


async def test_load_repository_puts_every_version_ready(tmp_path: Path) -> None:
    write_model(build_mlp(), tmp_path, "mlp", 1, MLP_CONFIG)
    write_model(build_echo_bytes(), tmp_path, "echo_bytes", 1)
    log = StateLog()
    registry = await loaded(tmp_path, log)
    try:
        assert registry.model_names() == ["echo_bytes", "mlp"]
        mlp_version = registry.get("mlp", 1)
        assert mlp_version is not None and mlp_version.state is ModelState.READY
        assert mlp_version.reason == ""
        mlp = registry.resolve("mlp")
        assert mlp is mlp_version.loaded, "routing hands out the READY version's loaded whole"
        assert (mlp.name, mlp.version) == ("mlp", 1)
        assert "CPUExecutionProvider" in mlp.providers
        assert mlp.signature.max_batch_size == 64
        assert mlp.signature.inputs == (TensorSpec("input", "FP32", (64,)),)
        assert mlp.signature.outputs == (TensorSpec("probabilities", "FP32", (10,)),)
        assert mlp.policy.max_queue_delay == pytest.approx(200e-6)
        assert mlp.default_timeout is None, "no timeout configured anywhere"
        assert states(registry, "echo_bytes") == {1: ModelState.READY}
        echo = registry.resolve("echo_bytes")
        assert echo.signature.max_batch_size == 32, "no config: the server default"
        assert echo.signature.inputs == (TensorSpec("text", "BYTES", ()),)
        for name in ("echo_bytes", "mlp"):
            steps = [(s, t is not None) for m, _, s, t in log.changes if m == name]
            assert steps == [(ModelState.LOADING, False), (ModelState.READY, True)]
    finally:
        await registry.shutdown()


@pytest.mark.parametrize(
    ("config", "served"),
    [
        (None, [3]),
        ("version_policy = { latest = 1 }\n", [3]),
        ("version_policy = { latest = 2 }\n", [2, 3]),
        ("version_policy = { all = true }\n", [1, 2, 3]),
        ("version_policy = { specific = [1, 3] }\n", [1, 3]),
    ],
)
async def test_version_policy_selects_the_versions_loaded(
    tmp_path: Path, config: str | None, served: list[int]
) -> None:
    for number in (2, 3, 1):
        write_model(build_mlp(), tmp_path, "mlp", number, config)
    registry = await loaded(tmp_path)
    try:
        assert states(registry, "mlp") == dict.fromkeys(served, ModelState.READY)
        assert registry.resolve("mlp").version == max(served)
    finally:
        await registry.shutdown()


async def test_corrupt_model_fails_with_a_reason_while_others_serve(tmp_path: Path) -> None:
    write_model(build_mlp(), tmp_path, "mlp", 1, "version_policy = { all = true }\n")
    corrupt = tmp_path / "mlp" / "2" / "model.onnx"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not onnx")
    write_model(build_echo_bytes(), tmp_path, "echo_bytes", 1)
    registry = await loaded(tmp_path)
    try:
        assert states(registry, "mlp") == {1: ModelState.READY, 2: ModelState.FAILED}
        failed = registry.versions("mlp")[1]
        assert failed.reason.startswith("loading mlp/2/model.onnx failed: "), failed.reason
        assert str(tmp_path) not in failed.reason, "paths relative to the repository"
        assert "\n" not in failed.reason
        assert failed.loaded is None
        # The newest READY version serves; the FAILED one is not routable.
        assert registry.resolve("mlp").version == 1
        with pytest.raises(ModelNotFound, match=r"version 2 is FAILED; ready versions: \[1\]"):
            registry.resolve("mlp", 2)
        assert states(registry, "echo_bytes") == {1: ModelState.READY}
        result = await registry.resolve("mlp").infer(mlp_request())
        assert result.outputs["probabilities"].shape == (1, 10)
    finally:
        await registry.shutdown()
    assert states(registry, "mlp") == {1: ModelState.UNLOADED, 2: ModelState.FAILED}


async def test_model_with_only_a_corrupt_version_has_no_ready_version(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken" / "1" / "model.onnx"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not onnx")
    registry = await loaded(tmp_path)
    assert states(registry, "broken") == {1: ModelState.FAILED}
    with pytest.raises(ModelNotFound, match="no READY version"):
        registry.resolve("broken")
    await registry.shutdown()


async def test_config_that_cannot_apply_to_the_graph_fails_the_version(tmp_path: Path) -> None:
    write_model(fixed_shape_model(), tmp_path, "fixed", 1, "max_batch_size = 4\n")
    write_model(fixed_shape_model(), tmp_path, "unbatched", 1)
    # No max_batch_size in the config: the server default (32) is below the preferred size.
    write_model(build_mlp(), tmp_path, "mlp", 1, "preferred_batch_sizes = [64]\n")
    registry = await loaded(tmp_path)
    try:
        fixed = registry.versions("fixed")[0]
        assert fixed.state is ModelState.FAILED
        assert "max_batch_size is 4 but tensor 'x'" in fixed.reason
        unbatched = registry.resolve("unbatched")
        assert unbatched.signature.max_batch_size == 0
        assert unbatched.signature.inputs == (TensorSpec("x", "FP32", (2, 3)),)
        mlp = registry.versions("mlp")[0]
        assert mlp.state is ModelState.FAILED
        assert "preferred batch size 64" in mlp.reason
    finally:
        await registry.shutdown()


async def test_loaded_version_runs_with_its_config_over_the_server_defaults(
    tmp_path: Path,
) -> None:
    write_model(build_mlp(), tmp_path, "plain", 1)
    write_model(
        build_mlp(),
        tmp_path,
        "configured",
        1,
        "max_queue_delay_us = 0\nmax_queue_size = 7\ndefault_timeout_us = 0\n",
    )
    defaults = ModelDefaults(
        max_batch_size=16,
        max_queue_delay_us=300,
        max_queue_size=99,
        instances=2,
        default_timeout_us=2_500_000,
        execution_providers=("cpu",),
    )
    registry = ModelRegistry(defaults)
    async with asyncio.timeout(WAIT):
        await ModelController(registry, ModelRepository(tmp_path)).start()
    try:
        plain = registry.resolve("plain")
        assert plain.policy == BatchingPolicy(
            max_batch_size=16, max_queue_delay=300e-6, max_queue_size=99, instances=2
        )
        assert plain.default_timeout == 2.5
        assert plain.providers == ("CPUExecutionProvider",)
        configured = registry.resolve("configured")
        assert configured.policy == BatchingPolicy(
            max_batch_size=16, max_queue_delay=0.0, max_queue_size=7, instances=2
        ), "the config's values, even 0, win over the defaults"
        assert configured.default_timeout is None, "0 in the config: no timeout"
    finally:
        await registry.shutdown()


async def test_a_load_derives_the_signature_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = signature_module.derive_signature
    calls: list[tuple[Any, ...]] = []

    def counting(*args: Any, **kwargs: Any) -> ModelSignature:
        calls.append(args)
        return original(*args, **kwargs)

    # Wherever inferd imported it from: every module holding the function gets the counter.
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith("inferd") and getattr(module, "derive_signature", None) is original:
            monkeypatch.setattr(module, "derive_signature", counting)
    write_model(build_mlp(), tmp_path, "mlp", 1, MLP_CONFIG)
    registry = await loaded(tmp_path)
    try:
        assert registry.resolve("mlp").signature.max_batch_size == 64
        assert len(calls) == 1
    finally:
        await registry.shutdown()


async def test_a_load_merges_the_config_over_the_defaults_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = EffectiveConfig.merge
    merged: list[EffectiveConfig] = []

    def counting(
        cls: type[EffectiveConfig], config: ModelConfig, defaults: ModelDefaults
    ) -> EffectiveConfig:
        merged.append(original(config, defaults))
        return merged[-1]

    monkeypatch.setattr(EffectiveConfig, "merge", classmethod(counting))
    handed_down: list[EffectiveConfig] = []

    def recording(path: Path, effective: EffectiveConfig, name: str) -> ModelSession:
        handed_down.append(effective)
        return onnxruntime_session(path, effective, name)

    path = write_model(build_mlp(), tmp_path, "mlp", 1)
    registry = ModelRegistry(ModelDefaults(max_batch_size=16), session_factory=recording)
    try:
        async with asyncio.timeout(WAIT):
            version = await registry.load_version("mlp", 1, path, ModelConfig(instances=2))
        assert version.state is ModelState.READY, version.reason
        assert len(merged) == 1
        assert handed_down[0] is merged[0], "the session gets the load's merge, not its own"
        loaded_version = registry.resolve("mlp")
        assert loaded_version.signature.max_batch_size == 16, "the default, via the merge"
        assert loaded_version.policy.instances == 2
    finally:
        await registry.shutdown()


async def test_model_directory_with_a_bad_config_is_skipped(tmp_path: Path) -> None:
    write_model(build_mlp(), tmp_path, "mlp", 1)
    write_model(build_mlp(), tmp_path, "typo", 1, "max_bacth_size = 8\n")
    registry = await loaded(tmp_path)
    try:
        assert registry.model_names() == ["mlp"]
        with pytest.raises(ModelNotFound):
            registry.resolve("typo")
    finally:
        await registry.shutdown()


# -- routing ---------------------------------------------------------------------------------


async def test_resolve_picks_the_newest_ready_version_or_the_one_named(tmp_path: Path) -> None:
    for number in (1, 2, 3):
        write_model(build_mlp(), tmp_path, "mlp", number, "version_policy = { all = true }\n")
    registry = await loaded(tmp_path)
    try:
        assert registry.resolve("mlp").version == 3
        assert registry.resolve("mlp", 2).version == 2
        with pytest.raises(
            ModelNotFound, match=r"version 7 is not served; ready versions: \[1, 2, 3\]"
        ):
            registry.resolve("mlp", 7)
        assert [v.version for v in registry.versions("mlp")] == [1, 2, 3]
    finally:
        await registry.shutdown()


async def test_resolve_unknown_model_is_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFound, match="model 'nope' is not served"):
        registry.resolve("nope")
    with pytest.raises(ModelNotFound):
        registry.versions("nope")


async def test_resolve_invalid_model_name_is_invalid_input(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidInput, match="model name"):
        registry.resolve("../mlp")


async def test_infer_matches_onnxruntime_in_process(registry: ModelRegistry) -> None:
    version = registry.resolve("mlp")
    session = ort.InferenceSession(str(version.path), providers=["CPUExecutionProvider"])
    x = mlp_input(5, seed=42)
    (expected,) = session.run(["probabilities"], {"input": x})
    async with asyncio.timeout(WAIT):
        result = await version.infer(InferRequest(model="mlp", inputs={"input": x}))
    assert result.model == "mlp" and result.version == 1
    assert result.batch_rows == 5
    np.testing.assert_allclose(result.outputs["probabilities"], expected, rtol=1e-5, atol=1e-6)
    assert version.statistics.execution_count == 1
    assert version.statistics.inference_count == 5


async def test_batched_requests_each_get_their_own_rows(registry: ModelRegistry) -> None:
    version = registry.resolve("mlp")
    session = ort.InferenceSession(str(version.path), providers=["CPUExecutionProvider"])
    requests = [mlp_request(rows, seed) for seed, rows in enumerate([1, 3, 2, 1])]
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(*(version.infer(r) for r in requests))
    for req, result in zip(requests, results, strict=True):
        (expected,) = session.run(None, req.inputs)
        np.testing.assert_allclose(result.outputs["probabilities"], expected, rtol=1e-5, atol=1e-6)


async def test_infer_strings_through_echo_bytes(registry: ModelRegistry) -> None:
    version = registry.resolve("echo_bytes")
    # ONNX Runtime takes string tensors as str (the frontends decode BYTES to str).
    text = np.array(["hello", "", "wörld"], dtype=object)
    async with asyncio.timeout(WAIT):
        result = await version.infer(InferRequest(model="echo_bytes", inputs={"text": text}))
    assert list(result.outputs["echo"]) == list(text)


# -- watching and shutdown -------------------------------------------------------------------


async def test_watch_yields_current_states_then_transitions(registry: ModelRegistry) -> None:
    events: list[ModelStatusEvent] = []
    caught_up = asyncio.Event()

    async def watcher() -> None:
        async with watching(registry) as stream:
            async for event in stream:
                events.append(event)
                if len(events) == 2:
                    caught_up.set()
                if sum(e.state is ModelState.UNLOADED for e in events) == 2:
                    return

    task = asyncio.create_task(watcher())
    async with asyncio.timeout(WAIT):
        await caught_up.wait()
        await registry.shutdown()
        await task
    current = [(e.model, e.version, e.state) for e in events[:2]]
    assert current == [("echo_bytes", 1, ModelState.READY), ("mlp", 1, ModelState.READY)]
    assert all(e.time > 0 for e in events)
    later = events[2:]
    assert [e.state for e in later] == [ModelState.UNLOADING] * 2 + [ModelState.UNLOADED] * 2
    assert {(e.model, e.version) for e in later[:2]} == {("echo_bytes", 1), ("mlp", 1)}
    assert {(e.model, e.version) for e in later[2:]} == {("echo_bytes", 1), ("mlp", 1)}
    assert all(e.reason == "server shutting down" for e in later)


async def test_watch_of_one_model_sees_only_that_model(registry: ModelRegistry) -> None:
    events: list[ModelStatusEvent] = []
    caught_up = asyncio.Event()

    async def watcher() -> None:
        async with watching(registry, "mlp") as stream:
            async for event in stream:
                events.append(event)
                caught_up.set()
                if event.state is ModelState.UNLOADED:
                    return

    task = asyncio.create_task(watcher())
    async with asyncio.timeout(WAIT):
        await caught_up.wait()
        await registry.shutdown()
        await task
    assert [(e.model, e.state) for e in events] == [
        ("mlp", ModelState.READY),
        ("mlp", ModelState.UNLOADING),
        ("mlp", ModelState.UNLOADED),
    ]


async def test_watch_of_an_unknown_model_is_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(ModelNotFound):
        await anext(registry.watch("nope"))


async def test_shutdown_answers_queued_requests_then_refuses(tmp_path: Path) -> None:
    # A long delay: queued requests would wait 5 s for a batch to fill; shutdown must not.
    write_model(
        build_mlp(), tmp_path, "mlp", 1, "max_batch_size = 64\nmax_queue_delay_us = 5000000\n"
    )
    three_queued = QueueDepthReached(3)
    registry = await loaded(tmp_path, three_queued)
    version: LoadedVersion = registry.resolve("mlp")
    requests = [mlp_request(rows=2, seed=i) for i in range(3)]
    tasks = [asyncio.create_task(version.infer(r)) for r in requests]
    async with asyncio.timeout(WAIT):
        await three_queued.reached.wait()
        assert version.batcher.queued == 3
        started = time.monotonic()
        await registry.shutdown()
    assert time.monotonic() - started < 4.0, "shutdown waited for the queue delay"
    assert all(t.done() for t in tasks), "shutdown returned before every request was answered"
    session = ort.InferenceSession(str(version.path), providers=["CPUExecutionProvider"])
    for req, task in zip(requests, tasks, strict=True):
        (expected,) = session.run(None, req.inputs)
        np.testing.assert_allclose(
            task.result().outputs["probabilities"], expected, rtol=1e-5, atol=1e-6
        )
        assert task.result().batch_rows == 6
    assert not registry.accepting
    assert states(registry, "mlp") == {1: ModelState.UNLOADED}
    assert version.batcher.closed
    assert isinstance(version.session, OnnxRuntimeSession) and version.session.closed
    with pytest.raises(Unavailable, match="shutting down"):
        registry.resolve("mlp")
    with pytest.raises(Unavailable):
        await version.infer(mlp_request())


async def test_version_still_loading_at_shutdown_is_not_left_ready(tmp_path: Path) -> None:
    write_model(build_mlp(), tmp_path, "mlp", 1)
    gate = threading.Event()

    opened: list[ModelSession] = []

    def gated_onnxruntime_session(
        path: Path, effective: EffectiveConfig, name: str
    ) -> ModelSession:
        gate.wait(WAIT)
        opened.append(onnxruntime_session(path, effective, name))
        return opened[-1]

    log = StateLog()
    registry = ModelRegistry(observer=log, session_factory=gated_onnxruntime_session)
    load = asyncio.create_task(ModelController(registry, ModelRepository(tmp_path)).start())
    try:
        async with asyncio.timeout(WAIT):
            await log.loading.wait()
            await registry.shutdown()
            gate.set()
            await load
    finally:
        gate.set()
    version = registry.versions("mlp")[0]
    try:
        assert version.state is not ModelState.READY
        assert version.loaded is None
        assert [isinstance(s, OnnxRuntimeSession) and s.closed for s in opened] == [True]
    finally:
        for session in opened:
            session.close()


# -- retired versions --------------------------------------------------------------------------


def polled(root: Path, registry: ModelRegistry, **settings: Any) -> ModelController:
    """A poll-mode controller whose poller, if any runs, is the test's choice (settings)."""
    settings.setdefault("poll_interval_s", 3600.0)
    return ModelController(
        registry, ModelRepository(root), ControlMode.POLL, settle_s=0.0, **settings
    )


async def test_retired_version_is_forgotten_after_the_retention(tmp_path: Path) -> None:
    config = "version_policy = { all = true }\n"
    for number in (1, 2):
        write_model(build_mlp(), tmp_path, "mlp", number, config)
    log = StateLog()
    registry = ModelRegistry(observer=log, retired_retention_s=60.0)
    controller = polled(tmp_path, registry)
    try:
        async with asyncio.timeout(WAIT):
            await controller.start()
            shutil.rmtree(tmp_path / "mlp" / "2")
            await controller.reconcile()
            corrupt = tmp_path / "mlp" / "3" / "model.onnx"
            corrupt.parent.mkdir()
            corrupt.write_bytes(b"not onnx")
            await controller.reconcile()
            await controller.reconcile()
        assert states(registry, "mlp") == {
            1: ModelState.READY,
            2: ModelState.UNLOADED,
            3: ModelState.FAILED,
        }
        retired = registry.get("mlp", 2)
        assert retired is not None and retired.retired_at is not None
        assert registry.forget_retired(retired.retired_at + 59.0) == [], "not yet"
        assert registry.forget_retired(retired.retired_at + 60.0) == [("mlp", 2)]
        assert states(registry, "mlp") == {1: ModelState.READY, 3: ModelState.FAILED}
        assert ("mlp", 2, ModelState.UNKNOWN, None) in log.changes, "the observer is told"
        assert registry.forget_retired(time.monotonic() + 3600.0) == [], "FAILED stays"

        # The whole model removed: its FAILED version is retired too, then the model goes.
        shutil.rmtree(tmp_path / "mlp")
        async with asyncio.timeout(WAIT):
            await controller.reconcile()
        assert states(registry, "mlp") == {1: ModelState.UNLOADED, 3: ModelState.UNLOADED}
        assert sorted(registry.forget_retired(time.monotonic() + 60.0)) == [
            ("mlp", 1),
            ("mlp", 3),
        ]
        assert registry.model_names() == []
        with pytest.raises(ModelNotFound):
            registry.versions("mlp")
    finally:
        await registry.shutdown()


async def test_zero_retention_forgets_at_once_but_not_at_shutdown(tmp_path: Path) -> None:
    write_model(build_mlp(), tmp_path, "mlp", 1)
    write_model(build_echo_bytes(), tmp_path, "echo_bytes", 1)
    registry = ModelRegistry(retired_retention_s=0.0)
    controller = polled(tmp_path, registry)
    async with asyncio.timeout(WAIT):
        await controller.start()
        write_model(build_mlp(), tmp_path, "mlp", 2)
        await controller.reconcile()
        await controller.reconcile()
    assert states(registry, "mlp") == {2: ModelState.READY}, "v1 replaced, then forgotten"
    await registry.shutdown()
    assert states(registry, "mlp") == {2: ModelState.UNLOADED}, "the final states stay"
    assert states(registry, "echo_bytes") == {1: ModelState.UNLOADED}


class Forgotten(Observer):
    def __init__(self) -> None:
        self.event = asyncio.Event()

    def model_state_changed(
        self, model: str, version: int, state: ModelState, reason: str, load_time: float | None
    ) -> None:
        if state is ModelState.UNKNOWN:
            self.event.set()


async def test_the_controller_forgets_retired_versions_in_explicit_mode(tmp_path: Path) -> None:
    write_model(build_mlp(), tmp_path, "mlp", 1)
    forgotten = Forgotten()
    registry = ModelRegistry(observer=forgotten, retired_retention_s=0.05)
    controller = ModelController(
        registry, ModelRepository(tmp_path), ControlMode.EXPLICIT, poll_interval_s=0.02
    )
    try:
        async with asyncio.timeout(WAIT):
            await controller.start()
            await controller.unload("mlp")
            assert states(registry, "mlp") == {1: ModelState.UNLOADED}
            await forgotten.event.wait()
        assert not registry.knows("mlp"), "swept by the controller's own task"
    finally:
        await controller.stop()
        await registry.shutdown()
