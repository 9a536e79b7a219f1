"""GPU tests: run on the device machine only (`pytest -m gpu tests/gpu`, from
scripts/gpu_check.sh). Everywhere else each test is skipped with the reason.

`INFERD_GPU_MODELS` may name a directory holding the reference models the GPU script exported
(resnet50.onnx, bert.onnx); tests that need them skip when it is unset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inferd.core.runtime.session import cuda_usable
from inferd.demo_models import build_cnn, build_mlp, write_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    if cuda_usable():
        return
    skip = pytest.mark.skip(
        reason="no usable CUDA GPU (cuda_usable() is False): GPU tests run on the device only"
    )
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gpu-models")
    write_model(build_mlp(), root, "mlp")
    write_model(build_cnn(), root, "cnn")
    return root


@pytest.fixture(scope="session")
def reference_models() -> Path:
    where = os.environ.get("INFERD_GPU_MODELS", "")
    if not where or not Path(where, "resnet50.onnx").is_file():
        pytest.skip("INFERD_GPU_MODELS does not hold resnet50.onnx (scripts/gpu_check.sh sets it)")
    return Path(where)
