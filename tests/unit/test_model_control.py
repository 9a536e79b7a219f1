"""ModelController over a real ModelRegistry and real ONNX Runtime (CPU), without gRPC: file
fingerprints, when a version on disk counts as complete, failure and retry, removal, version
policy, the repository index, explicit control, and warm-up.

Every model here computes y = x + c (FP32 [batch, 4]) with c chosen per test, so an output
proves which file computed it. Scans are driven by calling `reconcile()` directly: no poller
and no sleeping, except the SETTLE_S pause inside an explicit load.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from inferd.config import ServerConfig
from inferd.core.batching.batcher import BatchRun
from inferd.core.errors import FailedPrecondition, InvalidInput, ModelNotFound
from inferd.core.models.config import EffectiveConfig, ModelDefaults
from inferd.core.models.control import (
    READY_MARKER,
    ControlMode,
    ModelController,
    fingerprint,
)
from inferd.core.models.registry import ModelRegistry, ModelSession, onnxruntime_session
from inferd.core.models.repository import ModelRepository
from inferd.core.types import InferRequest, ModelState
from inferd.demo_models import IR_VERSION, OPSET, build_adder, write_model

# Real threads run here (ORT sessions, file I/O): bound every wait in real seconds.
WAIT = 30.0
MODEL = "adder"
CPU = ModelDefaults(execution_providers=("cpu",))


# --- models -----------------------------------------------------------------------------------


def rejected_graph() -> onnx.ModelProto:
    """A well-formed ONNX file whose graph ORT rejects: Add of FP32 and INT64."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"], name="add")],
        "rejected",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.ones(4, dtype=np.int64), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def publish(root: Path, version: int, c: float, config: str | None = None) -> Path:
    """`<root>/adder/<version>/model.onnx` computing x + c; returns the version directory."""
    return write_model(build_adder(c), root, MODEL, version, config).parent


def publish_garbage(root: Path, version: int) -> Path:
    directory = root / MODEL / str(version)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(b"this is not an onnx model " * 8)
    return directory


def publish_rejected_graph(root: Path, version: int) -> Path:
    return write_model(rejected_graph(), root, MODEL, version).parent


BROKEN: dict[str, Callable[[Path, int], Path]] = {
    "garbage-bytes": publish_garbage,
    "graph-ort-rejects": publish_rejected_graph,
}


def bump_mtime(path: Path) -> None:
    """A modification time surely different from the current one (coarse-mtime filesystems)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 3_000_000_000))


# --- a session factory that records what it opened and executed --------------------------------


class Recorder:
    """Wraps the real ORT session factory: which files were opened, which batches executed
    (warm-up included), and whether each session was closed."""

    def __init__(self) -> None:
        self.opened: list[Path] = []
        self.batches: list[tuple[Path, list[dict[str, np.ndarray]]]] = []
        self.closed: list[Path] = []

    def __call__(self, path: Path, effective: EffectiveConfig, name: str) -> ModelSession:
        self.opened.append(path)
        return _RecordingSession(onnxruntime_session(path, effective, name), path, self)

    def rows(self, path: Path) -> list[int]:
        """Rows of each batch executed on `path`, in order."""
        return [
            sum(len(request["x"]) for request in batch) for p, batch in self.batches if p == path
        ]

    def opened_count(self, path: Path) -> int:
        return sum(1 for p in self.opened if p == path)


class _RecordingSession:
    def __init__(self, inner: ModelSession, path: Path, recorder: Recorder) -> None:
        self._inner = inner
        self._path = path
        self._recorder = recorder
        self.providers = inner.providers
        self.signature = inner.signature

    def run_inline(self, batch: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str]) -> None:
        return None  # every batch goes through execute(), which records it

    async def execute(
        self, batch: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str]
    ) -> BatchRun:
        copied = [{k: np.array(v) for k, v in request.items()} for request in batch]
        self._recorder.batches.append((self._path, copied))
        return await self._inner.execute(batch, outputs)

    def close(self) -> None:
        self._recorder.closed.append(self._path)
        self._inner.close()


# --- fixtures ---------------------------------------------------------------------------------


Make = Callable[..., Awaitable[ModelController]]


@pytest.fixture
async def make_controller(tmp_path: Path) -> AsyncIterator[Make]:
    """`await make_controller(mode=..., require_ready_marker=..., start=..., settle_s=...)`:
    a controller over `tmp_path` with a Recorder (as `.recorder`); the registry is shut down
    afterwards."""
    made: list[ModelController] = []

    async def make(
        mode: ControlMode = ControlMode.POLL,
        require_ready_marker: bool = False,
        start: bool = True,
        settle_s: float = 0.0,
    ) -> ModelController:
        recorder = Recorder()
        registry = ModelRegistry(CPU, session_factory=recorder)
        controller = ModelController(
            registry,
            ModelRepository(tmp_path),
            mode,
            # No poller runs during a test: scans are the test's reconcile() calls.
            poll_interval_s=3600.0,
            require_ready_marker=require_ready_marker,
            # 0: files count as settled on the second scan that sees them unchanged; the settle
            # time itself is pinned by test_changed_files_wait_out_the_settle_time.
            settle_s=settle_s,
        )
        controller.recorder = recorder  # type: ignore[attr-defined]
        made.append(controller)
        if start:
            async with asyncio.timeout(WAIT):
                await controller.start()
        return controller

    yield make
    for controller in made:
        await controller.stop()
        if controller.registry.accepting:
            async with asyncio.timeout(WAIT):
                await controller.registry.shutdown()


def recorder_of(controller: ModelController) -> Recorder:
    recorder: Recorder = controller.recorder  # type: ignore[attr-defined]
    return recorder


async def scan(controller: ModelController, times: int = 1) -> None:
    for _ in range(times):
        async with asyncio.timeout(WAIT):
            await controller.reconcile()


def states(controller: ModelController) -> dict[int, ModelState]:
    return {v.version: v.state for v in controller.registry.versions_or_empty(MODEL)}


async def answer(controller: ModelController) -> tuple[int, float]:
    """Route one request like a frontend does: (version that answered, the c it added)."""
    target = controller.registry.resolve(MODEL)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    async with asyncio.timeout(WAIT):
        result = await target.infer(InferRequest(model=MODEL, inputs={"x": x}))
    added = result.outputs["y"] - x
    assert np.all(added == added[0, 0]), added
    return result.version, float(added[0, 0])


# --- fingerprints -----------------------------------------------------------------------------


def test_fingerprint_changes_with_size_mtime_and_config(tmp_path: Path) -> None:
    version_dir = publish(tmp_path, 1, 1.0)
    other = publish(tmp_path, 2, 2.0)
    model_file = version_dir / "model.onnx"
    first = fingerprint(version_dir)
    assert fingerprint(version_dir) == first, "unchanged files, same fingerprint"

    with model_file.open("ab") as f:
        f.write(b"\0")
    grown = fingerprint(version_dir)
    assert grown != first, "a file's size changed"

    before = model_file.stat()
    bump_mtime(model_file)
    assert model_file.stat().st_size == before.st_size
    touched = fingerprint(version_dir)
    assert touched != grown, "a file's modification time changed (same size)"

    (version_dir / "extra.bin").write_bytes(b"12")
    added = fingerprint(version_dir)
    assert added != touched, "a file was added to the version directory"

    config = tmp_path / MODEL / "config.toml"
    config.write_text("max_batch_size = 8\n")
    configured = fingerprint(version_dir)
    assert configured != added, "the model's config.toml appeared"
    config.write_text("max_batch_size = 16\n")
    bump_mtime(config)
    assert fingerprint(version_dir) != configured, "the model's config.toml changed"

    settled = fingerprint(version_dir)
    (other / "model.onnx").write_bytes(b"another version's files")
    assert fingerprint(version_dir) == settled, "another version's files are not this one's"


# --- completeness: two agreeing scans, trust at start, the ready marker ------------------------


async def test_poll_loads_a_new_version_only_when_the_next_scan_agrees(
    tmp_path: Path, make_controller: Make
) -> None:
    publish(tmp_path, 1, 1.0)
    controller = await make_controller()
    recorder = recorder_of(controller)
    assert states(controller) == {1: ModelState.READY}

    v2 = publish(tmp_path, 2, 2.0) / "model.onnx"
    await scan(controller)
    assert controller.registry.get(MODEL, 2) is None, "seen once: not loaded yet"
    assert recorder.opened_count(v2) == 0

    await scan(controller)
    assert states(controller)[2] is ModelState.READY, "the second scan agreed"
    assert await answer(controller) == (2, 2.0)

    # Files that change between the two scans are not complete: each change restarts the wait.
    v3 = publish(tmp_path, 3, 3.0) / "model.onnx"
    await scan(controller)
    write_model(build_adder(33.0), tmp_path, MODEL, 3)
    bump_mtime(v3)
    await scan(controller)
    assert controller.registry.get(MODEL, 3) is None, "changed since the last scan"
    assert recorder.opened_count(v3) == 0
    await scan(controller)
    assert states(controller)[3] is ModelState.READY
    assert await answer(controller) == (3, 33.0), "the files as they ended up"
    assert recorder.opened_count(v3) == 1


@pytest.mark.parametrize("mode", [ControlMode.NONE, ControlMode.POLL, ControlMode.EXPLICIT])
async def test_start_trusts_unseen_versions_and_loads_them_at_once(
    tmp_path: Path, make_controller: Make, mode: ControlMode
) -> None:
    publish(tmp_path, 1, 1.0)
    controller = await make_controller(mode=mode)
    assert states(controller) == {1: ModelState.READY}
    assert await answer(controller) == (1, 1.0)


async def test_required_ready_marker_is_honoured_at_start_and_in_polls(
    tmp_path: Path, make_controller: Make
) -> None:
    v1 = publish(tmp_path, 1, 1.0)
    controller = await make_controller(require_ready_marker=True)
    assert states(controller) == {}, "trusted at start, but the marker is still required"
    await scan(controller, 2)
    assert states(controller) == {}, "two agreeing scans do not replace the marker"
    assert recorder_of(controller).opened == []

    (v1 / READY_MARKER).touch()
    await scan(controller)
    assert states(controller) == {1: ModelState.READY}, "a marker needs no second scan"
    assert await answer(controller) == (1, 1.0)

    v2 = publish(tmp_path, 2, 2.0)
    await scan(controller, 3)
    assert controller.registry.get(MODEL, 2) is None, "complete files, no marker: not loaded"
    (v2 / READY_MARKER).touch()
    await scan(controller)
    assert states(controller)[2] is ModelState.READY
    assert await answer(controller) == (2, 2.0)


# --- failures and retries ----------------------------------------------------------------------


@pytest.mark.parametrize("broken", sorted(BROKEN))
async def test_failed_version_is_retried_only_after_its_files_change(
    tmp_path: Path, make_controller: Make, broken: str
) -> None:
    v1 = BROKEN[broken](tmp_path, 1) / "model.onnx"
    controller = await make_controller()
    recorder = recorder_of(controller)
    failed = controller.registry.get(MODEL, 1)
    assert failed is not None and failed.state is ModelState.FAILED
    assert "adder/1/model.onnx" in failed.reason, failed.reason
    assert str(tmp_path) not in failed.reason, "paths relative to the repository"
    assert recorder.opened_count(v1) == 1
    with pytest.raises(ModelNotFound):
        controller.registry.resolve(MODEL)

    await scan(controller, 3)
    assert controller.registry.get(MODEL, 1) is failed, "same files: not retried"
    assert recorder.opened_count(v1) == 1

    write_model(build_adder(1.0), tmp_path, MODEL, 1)
    bump_mtime(v1)
    await scan(controller)
    assert controller.registry.get(MODEL, 1) is failed, "changed files must settle first"
    await scan(controller)
    assert states(controller) == {1: ModelState.READY}, "retried once the files changed"
    assert recorder.opened_count(v1) == 2
    assert await answer(controller) == (1, 1.0)


async def test_failed_reload_of_a_ready_version_keeps_the_old_files_serving(
    tmp_path: Path, make_controller: Make
) -> None:
    v1 = publish(tmp_path, 1, 1.0) / "model.onnx"
    controller = await make_controller()
    recorder = recorder_of(controller)
    serving = controller.registry.get(MODEL, 1)

    v1.write_bytes(b"garbage " * 16)
    await scan(controller, 2)
    assert controller.registry.get(MODEL, 1) is serving, "the old files keep serving"
    assert serving is not None and serving.state is ModelState.READY
    assert serving.reason.startswith("reload failed"), serving.reason
    assert await answer(controller) == (1, 1.0)
    opened = recorder.opened_count(v1)
    await scan(controller, 2)
    assert recorder.opened_count(v1) == opened, "the failed files are not retried"

    write_model(build_adder(10.0), tmp_path, MODEL, 1)
    bump_mtime(v1)
    await scan(controller, 2)
    reloaded = controller.registry.get(MODEL, 1)
    assert reloaded is not serving and reloaded is not None
    assert reloaded.state is ModelState.READY and reloaded.reason == ""
    assert await answer(controller) == (1, 10.0)
    assert serving.loaded is not None and serving.loaded.batcher.closed, "the old files drained"
    assert recorder.closed == [v1], "the old session was freed, and only it"


# --- removal and version policy ----------------------------------------------------------------


async def test_versions_removed_from_disk_are_unloaded(
    tmp_path: Path, make_controller: Make
) -> None:
    config = "version_policy = { all = true }\n"
    publish(tmp_path, 1, 1.0, config)
    v2 = publish(tmp_path, 2, 2.0, config)
    controller = await make_controller()
    assert states(controller) == {1: ModelState.READY, 2: ModelState.READY}
    removed = controller.registry.get(MODEL, 2)

    shutil.rmtree(v2)
    await scan(controller)
    assert states(controller) == {1: ModelState.READY, 2: ModelState.UNLOADED}
    assert removed is not None and removed.loaded is not None and removed.loaded.batcher.closed
    assert recorder_of(controller).closed == [v2 / "model.onnx"], "its session was freed"
    assert await answer(controller) == (1, 1.0)

    shutil.rmtree(tmp_path / MODEL)
    await scan(controller)
    assert states(controller) == {1: ModelState.UNLOADED, 2: ModelState.UNLOADED}
    last = controller.registry.get(MODEL, 1)
    assert last is not None and "removed from the repository" in last.reason
    with pytest.raises(ModelNotFound):
        controller.registry.resolve(MODEL)


async def test_version_policy_latest_two_keeps_the_two_newest(
    tmp_path: Path, make_controller: Make
) -> None:
    config = "version_policy = { latest = 2 }\n"
    for number in (1, 2):
        publish(tmp_path, number, float(number), config)
    controller = await make_controller()
    assert states(controller) == {1: ModelState.READY, 2: ModelState.READY}

    publish(tmp_path, 3, 3.0)
    await scan(controller, 2)
    assert states(controller) == {
        1: ModelState.UNLOADED,
        2: ModelState.READY,
        3: ModelState.READY,
    }
    assert await answer(controller) == (3, 3.0), "no version asked: the newest READY"
    v2 = controller.registry.resolve(MODEL, 2)
    assert v2.version == 2


async def test_index_lists_versions_on_disk_but_not_loaded_as_unknown(
    tmp_path: Path, make_controller: Make
) -> None:
    publish(tmp_path, 1, 1.0)
    publish(tmp_path, 2, 2.0)
    write_model(build_adder(5.0), tmp_path, "other", 1)
    (tmp_path / "other" / "2").mkdir()
    (tmp_path / "other" / "2" / "model.onnx").write_bytes(b"garbage")
    controller = await make_controller()
    index = {(e.model, e.version): (e.state, e.reason) for e in await controller.index()}
    assert index[(MODEL, 1)] == (ModelState.UNKNOWN, "on disk, not loaded")
    assert index[(MODEL, 2)] == (ModelState.READY, "")
    assert index[("other", 1)] == (ModelState.UNKNOWN, "on disk, not loaded")
    state, reason = index[("other", 2)]
    assert state is ModelState.FAILED and "other/2/model.onnx" in reason, reason
    assert sorted(index) == [(MODEL, 1), (MODEL, 2), ("other", 1), ("other", 2)]


# --- explicit control --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [ControlMode.NONE, ControlMode.POLL])
async def test_load_and_unload_need_explicit_mode(
    tmp_path: Path, make_controller: Make, mode: ControlMode
) -> None:
    publish(tmp_path, 1, 1.0)
    controller = await make_controller(mode=mode)
    with pytest.raises(FailedPrecondition, match="explicit"):
        await controller.load(MODEL)
    with pytest.raises(FailedPrecondition, match="explicit"):
        await controller.unload(MODEL)
    assert states(controller) == {1: ModelState.READY}


async def test_explicit_load_and_unload(tmp_path: Path, make_controller: Make) -> None:
    controller = await make_controller(mode=ControlMode.EXPLICIT)
    assert states(controller) == {}

    publish(tmp_path, 1, 1.0)
    assert states(controller) == {}, "explicit mode: nothing loads by itself after start"
    async with asyncio.timeout(WAIT):
        await controller.load(MODEL)
    assert states(controller) == {1: ModelState.READY}
    assert await answer(controller) == (1, 1.0)

    async with asyncio.timeout(WAIT):
        await controller.unload(MODEL)
    assert states(controller) == {1: ModelState.UNLOADED}
    with pytest.raises(ModelNotFound):
        controller.registry.resolve(MODEL)

    async with asyncio.timeout(WAIT):
        await controller.load(MODEL)
    assert states(controller) == {1: ModelState.READY}, "loaded again after an unload"
    assert await answer(controller) == (1, 1.0)

    for name in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(InvalidInput):
            await controller.load(name)
        with pytest.raises(InvalidInput):
            await controller.unload(name)
    with pytest.raises(ModelNotFound):
        await controller.load("absent")
    with pytest.raises(ModelNotFound):
        await controller.unload("absent")

    broken_dir = tmp_path / "broken" / "1"
    broken_dir.mkdir(parents=True)
    (broken_dir / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(FailedPrecondition, match=r"v1: loading .*broken/1/model.onnx failed"):
        async with asyncio.timeout(WAIT):
            await controller.load("broken")


def test_model_control_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFERD_MODEL_CONTROL", "poll")
    monkeypatch.setenv("INFERD_POLL_INTERVAL_S", "0.25")
    monkeypatch.setenv("INFERD_REQUIRE_READY_MARKER", "true")
    monkeypatch.setenv("INFERD_CONTROL_TOKEN", "s3cret")
    config = ServerConfig.load(None)
    assert config.model_control == "poll"
    assert ControlMode(config.model_control) is ControlMode.POLL
    assert config.poll_interval_s == 0.25
    assert config.require_ready_marker is True
    assert config.control_token is not None
    assert config.control_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config), "the token is not printed"

    monkeypatch.setenv("INFERD_POLL_INTERVAL_S", "0")
    with pytest.raises(ValidationError, match="poll_interval_s"):
        ServerConfig.load(None)
    monkeypatch.setenv("INFERD_POLL_INTERVAL_S", "1")
    monkeypatch.setenv("INFERD_MODEL_CONTROL", "sometimes")
    with pytest.raises(ValidationError, match="model_control"):
        ServerConfig.load(None)


def test_model_control_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL_CONTROL", "POLL_INTERVAL_S", "REQUIRE_READY_MARKER", "CONTROL_TOKEN"):
        monkeypatch.delenv(f"INFERD_{name}", raising=False)
    config = ServerConfig.load(None, model_repository=Path("models"))
    assert (config.model_control, config.require_ready_marker, config.control_token) == (
        "none",
        False,
        None,
    )
    assert config.poll_interval_s == 5.0


# --- warm-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "rows"),
    [
        ("max_batch_size = 16\npreferred_batch_sizes = [4, 8]\n", [1, 4, 8, 16]),
        ("max_batch_size = 8\npreferred_batch_sizes = [8]\n", [1, 8]),
        ("max_batch_size = 1\n", [1]),
        (None, [1, 32]),
    ],
)
async def test_warmup_runs_every_batch_size_the_batcher_can_execute(
    tmp_path: Path, make_controller: Make, config: str | None, rows: list[int]
) -> None:
    v1 = publish(tmp_path, 1, 1.0, config) / "model.onnx"
    controller = await make_controller()
    recorder = recorder_of(controller)
    assert states(controller) == {1: ModelState.READY}
    assert recorder.rows(v1) == rows, "before READY, one run per batch size"
    for _, batch in recorder.batches:
        assert all(np.all(request["x"] == 0) for request in batch), "synthetic inputs: zeros"


async def test_warmup_uses_the_samples_in_the_models_warmup_directory(
    tmp_path: Path, make_controller: Make
) -> None:
    v1 = publish(tmp_path, 1, 1.0, "max_batch_size = 4\n") / "model.onnx"
    warmup = tmp_path / MODEL / "warmup"
    warmup.mkdir()
    np.savez(warmup / "a.npz", x=np.full((1, 4), 5.0, dtype=np.float32))
    np.savez(warmup / "b.npz", x=np.full((2, 4), 7.0, dtype=np.float32))
    controller = await make_controller()
    recorder = recorder_of(controller)
    assert states(controller) == {1: ModelState.READY}
    assert recorder.rows(v1) == [1, 4, 2], "each batch size from the first, then the others"
    values = [float(batch[0]["x"].flat[0]) for p, batch in recorder.batches if p == v1]
    assert values == [5.0, 5.0, 7.0]
    assert all(
        np.all(request["x"] == request["x"].flat[0])
        for _, batch in recorder.batches
        for request in batch
    )


async def test_warmup_sample_with_wrong_input_names_fails_the_version(
    tmp_path: Path, make_controller: Make
) -> None:
    v1 = publish(tmp_path, 1, 1.0) / "model.onnx"
    warmup = tmp_path / MODEL / "warmup"
    warmup.mkdir()
    np.savez(warmup / "wrong_names.npz", image=np.zeros((1, 4), dtype=np.float32))
    controller = await make_controller()
    version = controller.registry.get(MODEL, 1)
    assert version is not None and version.state is ModelState.FAILED
    assert "wrong_names.npz" in version.reason, version.reason
    assert "'x'" in version.reason, "the reason names the model's inputs"
    recorder = recorder_of(controller)
    assert recorder.closed == [v1], "the session opened for it was closed"

    (warmup / "wrong_names.npz").unlink()
    np.savez(warmup / "right_names.npz", x=np.ones((1, 4), dtype=np.float32))
    await scan(controller, 2)
    assert states(controller) == {1: ModelState.READY}, "retried: its warm-up files changed"


# --- availability while versions change ------------------------------------------------------


def _new_version_not_yet_complete(root: Path) -> int:
    publish(root, 2, 2.0)
    return 1


def _new_version_without_marker(root: Path) -> int:
    publish(root, 2, 2.0)
    return 1


def _new_version_that_fails(root: Path) -> int:
    publish_garbage(root, 2)
    return 3


RETIRE_CASES: dict[str, tuple[Callable[[Path], int], bool]] = {
    # case: (publish v2, return how many scans to run; require_ready_marker)
    "v2-seen-once": (_new_version_not_yet_complete, False),
    "v2-without-marker": (_new_version_without_marker, True),
    "v2-failed": (_new_version_that_fails, False),
}


@pytest.mark.parametrize("case", sorted(RETIRE_CASES))
async def test_old_version_keeps_serving_until_its_replacement_is_ready(
    tmp_path: Path, make_controller: Make, case: str
) -> None:
    publish_v2, marker = RETIRE_CASES[case]
    v1 = publish(tmp_path, 1, 1.0)
    if marker:
        (v1 / READY_MARKER).touch()
    controller = await make_controller(require_ready_marker=marker)
    assert states(controller) == {1: ModelState.READY}
    await scan(controller, publish_v2(tmp_path))
    assert controller.registry.get(MODEL, 2) is None or states(controller)[2] in (
        ModelState.FAILED,
        ModelState.UNKNOWN,
    )
    assert states(controller)[1] is ModelState.READY
    assert await answer(controller) == (1, 1.0)


async def test_watchers_are_not_told_a_serving_version_failed(
    tmp_path: Path, make_controller: Make
) -> None:
    v1 = publish(tmp_path, 1, 1.0) / "model.onnx"
    controller = await make_controller()
    events: list[tuple[int, ModelState]] = []
    stream = controller.registry.watch(MODEL)

    async def collect() -> None:
        async for event in stream:
            events.append((event.version, event.state))

    task = asyncio.get_running_loop().create_task(collect())
    try:
        await asyncio.sleep(0)
        v1.write_bytes(b"garbage " * 16)
        await scan(controller, 2)
        await asyncio.sleep(0)
        assert states(controller) == {1: ModelState.READY}
        assert events[0] == (1, ModelState.READY), "the current state first"
        assert events[-1] == (1, ModelState.READY), f"the watcher's view: {events}"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()  # type: ignore[attr-defined]


async def test_removing_the_newest_version_rolls_back_without_a_gap(
    tmp_path: Path, make_controller: Make
) -> None:
    """latest 1: deleting v2 brings v1 back; v2 (its session still in memory) serves until v1
    is READY again."""
    publish(tmp_path, 1, 1.0)
    controller = await make_controller()
    publish(tmp_path, 2, 2.0)
    await scan(controller, 2)
    assert states(controller) == {1: ModelState.UNLOADED, 2: ModelState.READY}

    shutil.rmtree(tmp_path / MODEL / "2")
    await scan(controller)
    assert states(controller) == {1: ModelState.UNLOADED, 2: ModelState.READY}
    assert await answer(controller) == (2, 2.0), "the removed version serves until v1 is back"
    await scan(controller)
    assert states(controller) == {1: ModelState.READY, 2: ModelState.UNLOADED}
    assert await answer(controller) == (1, 1.0)


async def test_latest_two_keeps_two_versions_until_their_replacements_are_ready(
    tmp_path: Path, make_controller: Make
) -> None:
    config = "version_policy = { latest = 2 }\n"
    publish(tmp_path, 1, 1.0, config)
    publish(tmp_path, 2, 2.0, config)
    controller = await make_controller()
    publish(tmp_path, 3, 3.0)
    await scan(controller)
    assert states(controller) == {1: ModelState.READY, 2: ModelState.READY}, "v3 seen once"
    await scan(controller)
    assert states(controller) == {
        1: ModelState.UNLOADED,
        2: ModelState.READY,
        3: ModelState.READY,
    }

    publish_garbage(tmp_path, 4)
    await scan(controller, 2)
    assert states(controller) == {
        1: ModelState.UNLOADED,
        2: ModelState.READY,
        3: ModelState.READY,
        4: ModelState.FAILED,
    }, "whatever served before keeps serving"
    assert controller.registry.resolve(MODEL, 2).version == 2


async def test_changed_files_wait_out_the_settle_time(
    tmp_path: Path, make_controller: Make
) -> None:
    """Without a marker, files must also have stayed unchanged for settle_s. Deterministic
    without a fake clock: a settle time no test run reaches, then one already passed."""
    publish(tmp_path, 1, 1.0)
    controller = await make_controller(settle_s=3600.0)
    assert states(controller) == {1: ModelState.READY}, "trusted at start: no settling"

    publish(tmp_path, 2, 2.0)
    await scan(controller, 3)
    assert controller.registry.get(MODEL, 2) is None, "unchanged across scans, not for settle_s"
    assert await answer(controller) == (1, 1.0), "the previous version serves meanwhile"

    controller.settle_s = 0.05
    await asyncio.sleep(0.1)
    await scan(controller)
    assert states(controller) == {1: ModelState.UNLOADED, 2: ModelState.READY}
    assert await answer(controller) == (2, 2.0)
