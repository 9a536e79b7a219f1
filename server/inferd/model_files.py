"""`inferd models validate` and `inferd models add`: checking a model file, and publishing it
into a repository atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from inferd.core.batching.policy import BatchingPolicy
from inferd.core.models.config import (
    EffectiveConfig,
    ModelConfig,
    ModelDefaults,
    load_model_config,
)
from inferd.core.models.control import READY_MARKER
from inferd.core.models.repository import CONFIG_FILE, MODEL_FILE, validate_model_name
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.core.types import ModelSignature


@dataclass(frozen=True)
class Validation:
    signature: ModelSignature
    policy: BatchingPolicy
    providers: tuple[str, ...]


def validate(
    model_file: Path, config: ModelConfig | None = None, defaults: ModelDefaults | None = None
) -> Validation:
    """Load the file in ONNX Runtime (CPU, one slot) and derive what inferd would serve, with
    the config merged over the defaults as a load merges it; raises with the reason when it
    would fail to load."""
    effective = EffectiveConfig.merge(config or ModelConfig(), defaults or ModelDefaults())
    session = OnnxRuntimeSession(
        model_file, resolve_providers(["cpu"], {}), name="validate", effective=effective
    )
    try:
        policy = effective.batching_policy(session.signature)
        return Validation(session.signature, policy, session.providers)
    finally:
        session.close()


def describe(validation: Validation) -> str:
    sig, policy = validation.signature, validation.policy
    batching = f"dim 0, up to {sig.max_batch_size} rows" if sig.batches else "no batch dim"
    lines = [f"batching: {batching}"]
    for kind, specs in (("input", sig.inputs), ("output", sig.outputs)):
        for spec in specs:
            lines.append(f"{kind:<6} {spec.name} {spec.datatype} {list(sig.full_shape(spec))}")
    lines.append(
        "config: "
        f"max_batch_size = {policy.max_batch_size}, "
        f"max_queue_delay_us = {round(policy.max_queue_delay * 1e6)}, "
        f"preferred_batch_sizes = {list(policy.preferred_batch_sizes)}, "
        f"max_queue_size = {policy.max_queue_size}, instances = {policy.instances}"
    )
    return "\n".join(lines)


def add(
    model_file: Path,
    repository: Path,
    name: str,
    version: int | None = None,
    config_file: Path | None = None,
) -> Path:
    """Publish `model_file` as `<repository>/<name>/<version>/model.onnx` atomically: it is
    validated, written under a hidden temporary name in the same directory (with its `.ready`
    marker) and renamed into place, so a server never sees a half-written version."""
    validate_model_name(name)
    config = load_model_config(config_file) if config_file else None
    validate(model_file, config)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    number = version if version is not None else max(existing, default=0) + 1
    if number < 1:
        raise ValueError(f"version must be >= 1, got {number}")
    target = model_dir / str(number)
    if target.exists():
        raise FileExistsError(f"{target} exists; versions are immutable, publish a new one")
    config_path = model_dir / CONFIG_FILE
    previous_config = config_path.read_bytes() if config_path.is_file() else None
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    config_replaced = False
    try:
        shutil.copyfile(model_file, staging / MODEL_FILE)
        (staging / READY_MARKER).touch()
        os.chmod(staging, 0o755)
        if config_file is not None:
            _replace_file(config_file.read_bytes(), config_path)
            config_replaced = True
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if config_replaced:
            # The version never appeared: the config goes back to what it was.
            if previous_config is None:
                config_path.unlink(missing_ok=True)
            else:
                _replace_file(previous_config, config_path)
        raise
    return target / MODEL_FILE


def _replace_file(content: bytes, destination: Path) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".staging-", dir=destination.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.chmod(temporary, 0o644)
    os.replace(temporary, destination)
