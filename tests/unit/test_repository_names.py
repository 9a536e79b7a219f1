"""What counts as a version directory and a model directory, and what a scan does with the rest:
only names of 1 to 18 ASCII digits are versions; anything else is skipped, reported once as a
problem (log and observer), and never stops the other models from loading, polling or starting.
Also: load-failure reasons name paths relative to the repository, never the server's own.

Real ONNX Runtime (CPU) with a tiny model computing y = x + c; scans are `reconcile()` calls."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from inferd.core.errors import FailedPrecondition, InvalidInput
from inferd.core.models.config import ModelConfig, ModelDefaults
from inferd.core.models.control import ControlMode, ModelController
from inferd.core.models.registry import ModelRegistry
from inferd.core.models.repository import MAX_VERSION, ModelRepository, printable
from inferd.core.observer import Observer, RepositoryProblem
from inferd.core.types import InferRequest, ModelState
from inferd.demo_models import build_adder, write_model

WAIT = 30.0
CPU = ModelDefaults(execution_providers=("cpu",))


def version_directory(root: Path, model: str, name: str, content: bytes | None = None) -> Path:
    """`<root>/<model>/<name>/model.onnx` (an adder unless `content` is given)."""
    directory = root / model / name
    directory.mkdir(parents=True, exist_ok=True)
    data = content if content is not None else build_adder(1.0).SerializeToString()
    (directory / "model.onnx").write_bytes(data)
    return directory


def problems_by_path(problems: Sequence[RepositoryProblem]) -> dict[str, str]:
    return {p.path: p.kind for p in problems}


class ProblemLog(Observer):
    def __init__(self) -> None:
        self.reports: list[list[RepositoryProblem]] = []

    def repository_problems_changed(self, problems: Sequence[RepositoryProblem]) -> None:
        self.reports.append(list(problems))


@pytest.fixture
async def controllers() -> AsyncIterator[list[ModelController]]:
    made: list[ModelController] = []
    yield made
    for controller in made:
        await controller.stop()
        if controller.registry.accepting:
            async with asyncio.timeout(WAIT):
                await controller.registry.shutdown()


async def started(
    root: Path,
    made: list[ModelController],
    mode: ControlMode = ControlMode.POLL,
    observer: Observer | None = None,
) -> ModelController:
    registry = ModelRegistry(CPU, observer=observer)
    # No poller runs in these tests: scans are the test's reconcile() calls.
    controller = ModelController(
        registry, ModelRepository(root), mode, poll_interval_s=3600.0, settle_s=0.0
    )
    made.append(controller)
    async with asyncio.timeout(WAIT):
        await controller.start()
    return controller


async def answers(registry: ModelRegistry, model: str) -> int:
    """The version that answers a request for `model` (the newest READY)."""
    x = np.zeros((1, 4), np.float32)
    async with asyncio.timeout(WAIT):
        result = await registry.resolve(model).infer(InferRequest(model=model, inputs={"x": x}))
    return result.version


# --- the version rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("1", 1),
        ("0", 0),
        ("0001", 1),
        ("42", 42),
        ("9" * 18, MAX_VERSION),
        ("1" + "0" * 17, 10**17),
    ],
)
def test_names_of_one_to_eighteen_ascii_digits_are_versions(
    tmp_path: Path, name: str, version: int
) -> None:
    version_directory(tmp_path, "m", name)
    sources, problems = ModelRepository(tmp_path).scan()
    assert problems == []
    assert sources[0].versions == {version: tmp_path / "m" / name / "model.onnx"}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("²", "1 to 18 digits 0-9"),  # str.isdigit() is True; int() refuses it
        ("\u0661", "1 to 18 digits 0-9"),  # ARABIC-INDIC DIGIT ONE: int() takes it as 1
        ("9" * 19, "19 digits"),  # 10**19 - 1 does not fit int64
        ("1" + "0" * 18, "19 digits"),
        ("99999999999999999999", "20 digits"),
        ("-1", "1 to 18 digits 0-9"),
        ("1.5", "1 to 18 digits 0-9"),
        ("v2", "1 to 18 digits 0-9"),
        ("1 ", "1 to 18 digits 0-9"),
        ("3\n", "1 to 18 digits 0-9"),
        ("+3", "1 to 18 digits 0-9"),
    ],
)
def test_other_directory_names_are_skipped_with_a_problem(
    tmp_path: Path, name: str, why: str
) -> None:
    version_directory(tmp_path, "m", "1")
    version_directory(tmp_path, "m", name)
    sources, problems = ModelRepository(tmp_path).scan()
    assert [s.name for s in sources] == ["m"]
    assert sources[0].versions == {1: tmp_path / "m" / "1" / "model.onnx"}, "the others serve"
    (problem,) = problems
    assert (problem.model, problem.kind) == ("m", "not_a_version")
    assert problem.path == printable(f"m/{name}")
    assert why in problem.reason, problem.reason
    assert problem.path.isprintable(), "safe in a log line and a metric label"


def test_files_are_not_versions_and_only_version_like_ones_are_problems(tmp_path: Path) -> None:
    version_directory(tmp_path, "m", "1")
    model = tmp_path / "m"
    (model / "2").write_bytes(build_adder(2.0).SerializeToString())  # a file named like a version
    for name in ("labels.txt", "README", "config.pbtxt.bak", "model.onnx"):
        (model / name).write_text("the model's own business\n")
    sources, problems = ModelRepository(tmp_path).scan()
    assert sources[0].versions == {1: model / "1" / "model.onnx"}
    assert problems_by_path(problems) == {"m/2": "not_a_version"}
    assert "a file, not a version directory" in problems[0].reason


def test_hidden_entries_and_the_warmup_directory_pass_silently(tmp_path: Path) -> None:
    version_directory(tmp_path, "m", "1")
    version_directory(tmp_path, "m", ".staging")  # a publisher's temporary directory
    (tmp_path / "m" / "warmup").mkdir()
    (tmp_path / ".trash").mkdir()
    (tmp_path / "m" / "3").mkdir()  # a version still being written: no model file yet
    sources, problems = ModelRepository(tmp_path).scan()
    assert sources[0].versions == {1: tmp_path / "m" / "1" / "model.onnx"}
    assert problems == []


def test_two_spellings_of_one_version_serve_the_plain_one(tmp_path: Path) -> None:
    for name in ("7", "007", "07"):
        version_directory(tmp_path, "m", name)
    version_directory(tmp_path, "n", "0005")
    version_directory(tmp_path, "n", "005")
    sources, problems = ModelRepository(tmp_path).scan()
    versions = {s.name: s.versions for s in sources}
    assert versions["m"] == {7: tmp_path / "m" / "7" / "model.onnx"}
    assert versions["n"] == {5: tmp_path / "n" / "0005" / "model.onnx"}, "else the first"
    assert problems_by_path(problems) == {
        "m/007": "duplicate_version",
        "m/07": "duplicate_version",
        "n/005": "duplicate_version",
    }
    assert all("also version" in p.reason for p in problems)


# --- model directories ---------------------------------------------------------------------------


def test_odd_model_directory_names_skip_only_themselves(tmp_path: Path) -> None:
    version_directory(tmp_path, "good", "1")
    undecodable = os.fsdecode(b"bad\xff\xfename")
    for name in (undecodable, "x" * 255, "new\nline", "sp ace", "ünïcode", "-dash"):
        version_directory(tmp_path, name, "1")
    sources, problems = ModelRepository(tmp_path).scan()
    assert [s.name for s in sources] == ["good"]
    assert {p.kind for p in problems} == {"invalid_name"}
    assert len(problems) == 6
    paths = {p.path for p in problems}
    assert "bad\\xff\\xfename" in paths, "bytes that are not UTF-8, escaped"
    assert "new\\nline" in paths
    assert "ünïcode" in paths, "UTF-8 names stay readable"
    assert all(p.path.isprintable() and len(p.path) <= 256 for p in problems)
    assert all(p.model == p.path for p in problems)


def test_an_unreadable_model_directory_skips_only_that_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version_directory(tmp_path, "good", "1")
    version_directory(tmp_path, "locked", "1")
    (tmp_path / "undecodable").mkdir()
    version_directory(tmp_path, "undecodable", "1")
    (tmp_path / "undecodable" / "config.toml").write_bytes(b"max_batch_size = \xff\xfe\n")
    real_iterdir = Path.iterdir
    locked = tmp_path / "locked"

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self == locked:  # as for a directory without read permission (tests may run as root)
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    sources, problems = ModelRepository(tmp_path).scan()
    assert [s.name for s in sources] == ["good"]
    assert problems_by_path(problems) == {"locked": "unreadable", "undecodable": "unreadable"}
    reasons = {p.path: p.reason for p in problems}
    assert reasons["locked"] == "cannot be read: Permission denied"
    assert "utf-8" in reasons["undecodable"]
    assert str(tmp_path) not in "".join(reasons.values())


def test_config_problems_name_the_file_relative_to_the_repository(tmp_path: Path) -> None:
    version_directory(tmp_path, "m", "1")
    (tmp_path / "m" / "config.toml").write_text("max_batch_size = [\n")
    _, problems = ModelRepository(tmp_path).scan()
    (problem,) = problems
    assert problem.kind == "config"
    assert problem.reason.startswith("m/config.toml: not valid TOML"), problem.reason
    assert str(tmp_path) not in problem.reason


# --- the controller: other models keep loading, polling and starting ----------------------------


@pytest.mark.parametrize("mode", [ControlMode.NONE, ControlMode.POLL, ControlMode.EXPLICIT])
async def test_start_with_odd_directories_loads_every_other_model(
    tmp_path: Path, controllers: list[ModelController], mode: ControlMode
) -> None:
    write_model(build_adder(1.0), tmp_path, "a", 1)
    write_model(build_adder(2.0), tmp_path, "b", 2)
    for name in ("²", "99999999999999999999", "\u0661"):
        version_directory(tmp_path, "a", name)
    version_directory(tmp_path, os.fsdecode(b"\xff"), "1")
    controller = await started(tmp_path, controllers, mode)
    registry = controller.registry
    assert registry.model_names() == ["a", "b"]
    assert [(v.version, v.state) for v in registry.versions("a")] == [(1, ModelState.READY)]
    assert await answers(registry, "a") == 1
    assert await answers(registry, "b") == 2
    assert {p.path for p in controller.problems} == {
        "a/²",
        "a/99999999999999999999",
        "a/\u0661",
        "\\xff",
    }


async def test_odd_directory_appearing_while_polling_is_reported_once(
    tmp_path: Path, controllers: list[ModelController], caplog: pytest.LogCaptureFixture
) -> None:
    write_model(build_adder(1.0), tmp_path, "a", 1)
    write_model(build_adder(2.0), tmp_path, "b", 1)
    problems = ProblemLog()
    controller = await started(tmp_path, controllers, observer=problems)
    assert problems.reports == [], "a clean repository reports nothing"

    version_directory(tmp_path, "a", "²")
    version_directory(tmp_path, "a", "12345678901234567890")
    with caplog.at_level(logging.WARNING, logger="inferd.core.models.control"):
        for _ in range(4):
            async with asyncio.timeout(WAIT):
                await controller.reconcile()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "model 'a': 'a/²' skipped: not a version directory" in warnings[0] + warnings[1]
    assert len(problems.reports) == 1, "reported when the list changed, not every scan"
    assert problems_by_path(problems.reports[0]) == {
        "a/12345678901234567890": "not_a_version",
        "a/²": "not_a_version",
    }

    # Polling goes on for every model: a new version of b still loads.
    write_model(build_adder(3.0), tmp_path, "b", 3)
    for _ in range(2):
        async with asyncio.timeout(WAIT):
            await controller.reconcile()
    assert await answers(controller.registry, "b") == 3
    assert await answers(controller.registry, "a") == 1

    (tmp_path / "a" / "²" / "model.onnx").unlink()
    (tmp_path / "a" / "²").rmdir()
    async with asyncio.timeout(WAIT):
        await controller.reconcile()
    assert problems_by_path(problems.reports[-1]) == {"a/12345678901234567890": "not_a_version"}


async def test_one_models_reconcile_failing_leaves_the_others_polling(
    tmp_path: Path, controllers: list[ModelController], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_model(build_adder(1.0), tmp_path, "a", 1)
    write_model(build_adder(1.0), tmp_path, "b", 1)
    controller = await started(tmp_path, controllers)
    from inferd.core.models import control

    real_fingerprint = control.fingerprint

    def fingerprint(version_dir: Path) -> str:
        if version_dir.parent.name == "a":
            raise PermissionError(13, "Permission denied", str(version_dir))
        return real_fingerprint(version_dir)

    monkeypatch.setattr(control, "fingerprint", fingerprint)
    write_model(build_adder(2.0), tmp_path, "b", 2)
    for _ in range(2):
        async with asyncio.timeout(WAIT):
            await controller.reconcile()
    assert await answers(controller.registry, "b") == 2
    assert await answers(controller.registry, "a") == 1, "a keeps what it served"


async def test_a_served_model_whose_config_breaks_keeps_serving(
    tmp_path: Path, controllers: list[ModelController]
) -> None:
    write_model(build_adder(1.0), tmp_path, "a", 1)
    controller = await started(tmp_path, controllers)
    (tmp_path / "a" / "config.toml").write_text("max_batch_size = 'eight'\n")
    for _ in range(3):
        async with asyncio.timeout(WAIT):
            await controller.reconcile()
    assert [(v.version, v.state) for v in controller.registry.versions("a")] == [
        (1, ModelState.READY)
    ]
    assert await answers(controller.registry, "a") == 1
    assert {(p.path, p.kind) for p in controller.problems} == {("a", "config")}


async def test_explicit_load_of_a_model_with_a_broken_config_says_why_without_server_paths(
    tmp_path: Path, controllers: list[ModelController]
) -> None:
    controller = await started(tmp_path, controllers, ControlMode.EXPLICIT)
    write_model(build_adder(1.0), tmp_path, "a", 1, config_toml="max_batch_size = [\n")
    with pytest.raises(FailedPrecondition) as refused:
        async with asyncio.timeout(WAIT):
            await controller.load("a")
    assert "model 'a' is skipped: a/config.toml: not valid TOML" in refused.value.message
    assert str(tmp_path) not in refused.value.message


async def test_failed_reasons_name_paths_relative_to_the_repository(
    tmp_path: Path, controllers: list[ModelController]
) -> None:
    version_directory(tmp_path, "garbage", "1", b"not an onnx model")
    write_model(build_adder(1.0), tmp_path, "warm", 1)
    (tmp_path / "warm" / "warmup").mkdir()
    np.savez(tmp_path / "warm" / "warmup" / "wrong.npz", image=np.zeros((1, 4), np.float32))
    controller = await started(tmp_path, controllers)
    reasons = {}
    for name in ("garbage", "warm"):
        (version,) = controller.registry.versions(name)
        assert version.state is ModelState.FAILED
        reasons[name] = version.reason
    assert reasons["garbage"].startswith("loading garbage/1/model.onnx failed: "), reasons
    assert "Load model from garbage/1/model.onnx failed" in reasons["garbage"], "ORT's text too"
    assert reasons["warm"].startswith("warm/warmup/wrong.npz: holds arrays"), reasons
    for reason in reasons.values():
        assert str(tmp_path) not in reason


async def test_the_registry_never_holds_a_version_the_wire_cannot_carry(tmp_path: Path) -> None:
    path = write_model(build_adder(1.0), tmp_path, "a", 1)
    registry = ModelRegistry(CPU)
    try:
        for number in (MAX_VERSION + 1, 2**63, -1):
            with pytest.raises(InvalidInput, match=r"is not in 0\.\."):
                await registry.load_version("a", number, path, ModelConfig())
        assert registry.model_names() == []
        async with asyncio.timeout(WAIT):
            version = await registry.load_version("a", MAX_VERSION, path, ModelConfig())
        assert version.state is ModelState.READY
    finally:
        await registry.shutdown()
