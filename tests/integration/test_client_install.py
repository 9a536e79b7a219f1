"""`pip install ./client` in a fresh virtual environment brings the client alone: its import
works from outside the checkout, and no server dependency (ONNX Runtime, OpenTelemetry,
pydantic) comes with it. And the development install exposes only the installed names: the
checkout's folder names do not import from outside it.

The install may download wheels from the package index (pip's own configuration); it is
bounded by INSTALL_TIMEOUT_S.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration_support import PROJECT_ROOT, add_summary_line

INSTALL_TIMEOUT_S = 480
SERVER_ONLY = ("onnxruntime", "opentelemetry", "pydantic")


def _env() -> dict[str, str]:
    """Ours, without anything that would put the checkout or our venv on a child's path."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env(), check=False
    )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A fresh venv (no system site packages) with a copy of client/ pip-installed into it;
    the copy keeps build/ and *.egg-info out of the checkout."""
    root = tmp_path_factory.mktemp("client_install")
    source = root / "client"
    shutil.copytree(
        PROJECT_ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
    )
    venv = root / "venv"
    began = time.monotonic()
    made = _run([sys.executable, "-m", "venv", str(venv)], root, 120)
    assert made.returncode == 0, made.stderr
    installed = _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
        root,
        INSTALL_TIMEOUT_S,
    )
    assert installed.returncode == 0, f"{installed.stdout}\n{installed.stderr}"
    add_summary_line(
        request.config,
        f"client install: fresh venv + `pip install ./client` in {time.monotonic() - began:.0f} s",
    )
    return venv


@pytest.mark.timeout(600)
def test_client_install_brings_no_server_dependencies(client_venv: Path, tmp_path: Path) -> None:
    listed = _run(
        [str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], tmp_path, 120
    )
    assert listed.returncode == 0, listed.stderr
    names = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed.stdout)}
    assert "inferd-client" in names
    assert {"grpcio", "grpcio-health-checking", "protobuf", "numpy", "ml-dtypes"} <= names
    assert sorted(n for n in names if n.startswith(SERVER_ONLY)) == []
    assert "inferd" not in names


@pytest.mark.timeout(600)
def test_client_imports_from_outside_the_checkout(client_venv: Path, tmp_path: Path) -> None:
    done = _run(
        [
            str(client_venv / "bin" / "python"),
            "-c",
            "import inferd_client; from inferd_client import InferClient, AsyncInferClient; "
            "print(inferd_client.__file__)",
        ],
        tmp_path,
        120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_relative_to(client_venv)


@pytest.mark.parametrize("name", ["server", "client", "loadtest", "inference", "gen"])
def test_checkout_folder_names_do_not_import_in_the_dev_install(name: str, tmp_path: Path) -> None:
    done = _run(
        [
            sys.executable,
            "-c",
            f"try:\n    import {name}\nexcept ModuleNotFoundError:\n    print('absent')\n"
            f"else:\n    print({name}.__spec__)",
        ],
        tmp_path,
        60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "absent", f"`import {name}` found {done.stdout.strip()}"
