"""Virtual environments for the peer servers, kept apart from the project's own `.venv`
(under `.bench/venvs/`, git-ignored) so their dependencies never mix with ours. Each is made
once and reused while its requirement list is unchanged."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from inferd.loadtest.bench import PROJECT_ROOT

VENV_ROOT = PROJECT_ROOT / ".bench" / "venvs"
INSTALL_TIMEOUT_S = 1200.0


class PeerUnavailable(RuntimeError):
    """A peer server cannot run here; the message says exactly why."""


def onnxruntime_requirement() -> str:
    """The ONNX Runtime inferd runs, so every peer executes the model with the same version."""
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return f"onnxruntime=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "onnxruntime"


def base_python() -> str:
    """The interpreter our venv was made from (peers get the same Python version)."""
    return getattr(sys, "_base_executable", sys.executable)


def ensure_venv(name: str, requirements: list[str], root: Path = VENV_ROOT) -> Path:
    """`root/name` with `requirements` installed; PeerUnavailable with pip's words if not."""
    venv = root / name
    stamp = venv / ".bench-requirements"
    wanted = "\n".join(requirements) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted and (venv / "bin" / "python").exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [base_python(), "-m", "venv", "--clear", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
    ]
    for step in steps:
        try:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            raise PeerUnavailable(
                f"`{' '.join(step[-3:])}` did not finish in {INSTALL_TIMEOUT_S:.0f} s"
            ) from None
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
            raise PeerUnavailable(
                f"`{' '.join(step[2:])}` failed (exit {done.returncode}):\n{tail}"
            )
    stamp.write_text(wanted)
    return venv


def venv_python_value(venv: Path, expression: str) -> str:
    """Evaluate a Python expression with the venv's interpreter (e.g. its site-packages)."""
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", f"print({expression})"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()
