"""`inferd models validate` and `inferd models add`: what validate prints, and how add
publishes a model file into a repository (next version number, `.ready` marker, atomic rename,
refusals, nothing left behind on failure).

The commands run in-process through `inferd.cli.main`, so each takes milliseconds; one test
runs the real `python -m inferd.cli` entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from inferd import model_files
from inferd.cli import main
from inferd.core.models.control import READY_MARKER
from inferd.demo_models import (
    IR_VERSION,
    MLP_CONFIG,
    OPSET,
    build_mlp,
    build_text_encoder,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def fixed_shape_model() -> onnx.ModelProto:
    """Identity on FP32 [2, 3]: dim 0 is fixed, so it is not a batch dim."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def rejected_graph() -> onnx.ModelProto:
    """Valid ONNX that ORT refuses: Add of FP32 and INT64."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "rejected",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.ones(4, dtype=np.int64), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def inferd(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `inferd ARGS` run in-process."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def staging_leftovers(repository: Path) -> list[Path]:
    return sorted(repository.rglob(".staging-*")) if repository.exists() else []


@pytest.fixture
def mlp_file(tmp_path: Path) -> Path:
    return save(build_mlp(), tmp_path / "src" / "mlp.onnx")


# --- validate ----------------------------------------------------------------------------------


def test_validate_mlp_prints_batching_tensors_and_the_config_it_would_use(
    capsys: pytest.CaptureFixture[str], mlp_file: Path, tmp_path: Path
) -> None:
    rc, out, err = inferd(capsys, "models", "validate", str(mlp_file))
    assert rc == 0, err
    assert out.splitlines() == [
        "batching: dim 0, up to 32 rows",
        "input  input FP32 [-1, 64]",
        "output probabilities FP32 [-1, 10]",
        "config: max_batch_size = 32, max_queue_delay_us = 0, preferred_batch_sizes = [], "
        "max_queue_size = 1024, instances = 1",
    ]

    config = tmp_path / "config.toml"
    config.write_text(MLP_CONFIG + "preferred_batch_sizes = [8, 16]\n")
    rc, out, err = inferd(capsys, "models", "validate", str(mlp_file), "--config", str(config))
    assert rc == 0, err
    assert out.splitlines()[0] == "batching: dim 0, up to 64 rows"
    assert out.splitlines()[-1] == (
        "config: max_batch_size = 64, max_queue_delay_us = 200, preferred_batch_sizes = [8, 16], "
        "max_queue_size = 1024, instances = 1"
    )


def test_validate_text_encoder_lists_both_inputs_with_variable_dims(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = save(build_text_encoder(), tmp_path / "text_encoder.onnx")
    rc, out, err = inferd(capsys, "models", "validate", str(path))
    assert rc == 0, err
    assert out.splitlines() == [
        "batching: dim 0, up to 32 rows",
        "input  input_ids INT64 [-1, -1]",
        "input  attention_mask INT64 [-1, -1]",
        "output embedding FP32 [-1, 128]",
        "config: max_batch_size = 32, max_queue_delay_us = 0, preferred_batch_sizes = [], "
        "max_queue_size = 1024, instances = 1",
    ]


def test_validate_reports_a_model_without_a_batch_dim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = save(fixed_shape_model(), tmp_path / "fixed.onnx")
    rc, out, err = inferd(capsys, "models", "validate", str(path))
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "batching: no batch dim"
    assert lines[1:3] == ["input  x FP32 [2, 3]", "output y FP32 [2, 3]"]
    assert "max_batch_size = 0" in lines[3]


@pytest.mark.parametrize("content", ["garbage", "rejected-graph", "empty", "missing"])
def test_validate_of_a_broken_file_fails_nonzero_with_the_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str
) -> None:
    path = tmp_path / "broken.onnx"
    if content == "garbage":
        path.write_bytes(os.urandom(64) + b"not an onnx model")
    elif content == "rejected-graph":
        save(rejected_graph(), path)
    elif content == "empty":
        path.write_bytes(b"")
    rc, out, err = inferd(capsys, "models", "validate", str(path))
    assert rc != 0
    assert out == ""
    assert err.startswith("invalid: "), err
    assert len(err.strip()) > len("invalid: "), "the reason is given"


def test_validate_through_the_installed_entry_point(mlp_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    ok = subprocess.run(
        [sys.executable, "-m", "inferd.cli", "models", "validate", str(mlp_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "output probabilities FP32 [-1, 10]" in ok.stdout


# --- add ---------------------------------------------------------------------------------------


def test_add_publishes_the_next_version_with_a_ready_marker(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp_file: Path
) -> None:
    repository = tmp_path / "repo"
    source = mlp_file.read_bytes()
    published: list[int] = []
    for explicit in (None, None, 7, None):
        args = ["models", "add", str(mlp_file), "--repository", str(repository), "--name", "m"]
        if explicit is not None:
            args += ["--version", str(explicit)]
        rc, out, err = inferd(capsys, *args)
        assert rc == 0, err
        target = Path(out.strip())
        assert target.name == "model.onnx"
        assert target.parent.parent == repository / "m"
        published.append(int(target.parent.name))
        assert target.read_bytes() == source, "byte-identical to the source"
        assert (target.parent / READY_MARKER).is_file()
        assert target.parent.stat().st_mode & 0o777 == 0o755, "readable by a server user"
    assert published == [1, 2, 7, 8], "newest on disk + 1, unless --version says"
    assert sorted(p.name for p in (repository / "m").iterdir()) == ["1", "2", "7", "8"]
    assert staging_leftovers(repository) == []


def test_add_installs_the_config_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp_file: Path
) -> None:
    repository = tmp_path / "repo"
    config = tmp_path / "config.toml"
    config.write_text(MLP_CONFIG)
    rc, _, err = inferd(
        capsys,
        *("models", "add", str(mlp_file), "--repository", str(repository), "--name", "m"),
        *("--config", str(config)),
    )
    assert rc == 0, err
    assert (repository / "m" / "config.toml").read_text() == MLP_CONFIG
    assert staging_leftovers(repository) == []

    bad = tmp_path / "bad.toml"
    bad.write_text("max_batch_sise = 8\n")
    rc, _, err = inferd(
        capsys,
        *("models", "add", str(mlp_file), "--repository", str(repository), "--name", "m"),
        *("--config", str(bad)),
    )
    assert rc != 0 and "max_batch_sise" in err
    assert sorted(p.name for p in (repository / "m").iterdir()) == ["1", "config.toml"]
    assert (repository / "m" / "config.toml").read_text() == MLP_CONFIG


def test_add_refuses_an_existing_version(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp_file: Path
) -> None:
    repository = tmp_path / "repo"
    base = ["models", "add", str(mlp_file), "--repository", str(repository), "--name", "m"]
    assert inferd(capsys, *base)[0] == 0
    published = repository / "m" / "1" / "model.onnx"
    before = published.stat()

    other = save(build_text_encoder(), tmp_path / "src" / "other.onnx")
    rc, out, err = inferd(
        capsys,
        *("models", "add", str(other), "--repository", str(repository), "--name", "m"),
        *("--version", "1"),
    )
    assert rc != 0
    assert out == ""
    assert "exists" in err, err
    assert published.read_bytes() == mlp_file.read_bytes(), "the published version is untouched"
    assert published.stat().st_mtime_ns == before.st_mtime_ns
    assert staging_leftovers(repository) == []

    rc, _, err = inferd(capsys, *base, "--version", "0")
    assert rc != 0 and "version" in err
    assert sorted(p.name for p in (repository / "m").iterdir()) == ["1"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x..y", "/abs"])
def test_add_refuses_bad_model_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, mlp_file: Path, name: str
) -> None:
    repository = tmp_path / "repo"
    repository.mkdir()
    rc, out, err = inferd(
        capsys, "models", "add", str(mlp_file), "--repository", str(repository), "--name", name
    )
    assert rc != 0
    assert out == ""
    assert "invalid" in err, err
    assert list(repository.iterdir()) == [], "nothing written"
    assert list((tmp_path).glob("x*")) == []


@pytest.mark.parametrize("content", ["garbage", "rejected-graph"])
def test_add_of_a_model_that_does_not_load_publishes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: str
) -> None:
    path = tmp_path / "broken.onnx"
    if content == "garbage":
        path.write_bytes(b"garbage" * 20)
    else:
        save(rejected_graph(), path)
    repository = tmp_path / "repo"
    rc, out, err = inferd(
        capsys, "models", "add", str(path), "--repository", str(repository), "--name", "m"
    )
    assert rc != 0 and out == "" and err.startswith("error: ")
    assert not (repository / "m").exists()
    assert staging_leftovers(tmp_path) == []


def test_add_that_fails_after_staging_leaves_no_staging_directory(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    mlp_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repository = tmp_path / "repo"
    base = ["models", "add", str(mlp_file), "--repository", str(repository), "--name", "m"]
    assert inferd(capsys, *base)[0] == 0

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(model_files.os, "rename", failing_rename)
    rc, _, err = inferd(capsys, *base)
    assert rc != 0 and "simulated" in err
    assert staging_leftovers(repository) == []
    assert sorted(p.name for p in (repository / "m").iterdir()) == ["1"]


def test_add_with_a_config_that_fails_at_the_rename_leaves_the_config_as_it_was(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    mlp_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repository = tmp_path / "repo"
    base = ["models", "add", str(mlp_file), "--repository", str(repository), "--name", "m"]
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text("max_batch_size = 4\n")
    new.write_text("max_batch_size = 16\n")
    assert inferd(capsys, *base, "--config", str(old))[0] == 0

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(model_files.os, "rename", failing_rename)
    rc, _, _ = inferd(capsys, *base, "--config", str(new))
    assert rc != 0
    assert staging_leftovers(repository) == []
    assert (repository / "m" / "config.toml").read_text() == "max_batch_size = 4\n"
