"""The model repository on disk: `<root>/<model>/<version>/model.onnx`, numeric versions, and an
optional `<root>/<model>/config.toml` (inferd's) or `config.pbtxt` (Triton's; config.toml wins
when both exist)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from inferd.core.errors import InvalidInput
from inferd.core.models.config import ModelConfig, load_model_config
from inferd.core.models.triton_config import TritonModelConfig, load_triton_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
TRITON_CONFIG_FILE = "config.pbtxt"

# (model, file) pairs whose choice of configuration file has been logged: rescans stay quiet.
_announced: set[tuple[str, str]] = set()

# No path separators, no "..", no hidden names: a model name is also a directory name.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def validate_model_name(name: str) -> None:
    if not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"model name {name!r} is invalid: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )


@dataclass(frozen=True, slots=True)
class ModelSource:
    """One model as found on disk: its config and the version files it offers."""

    name: str
    directory: Path
    config: ModelConfig
    versions: dict[int, Path]

    def selected_versions(self) -> dict[int, Path]:
        """The versions the config's version policy says to serve."""
        chosen = self.config.version_policy.select(list(self.versions))
        return {v: self.versions[v] for v in chosen}


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """A model directory that could not be read (e.g. a bad config.toml)."""

    name: str
    reason: str


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def scan(self) -> tuple[list[ModelSource], list[ScanProblem]]:
        """Read every model directory. Blocks on file I/O: call it off the event loop."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        models: list[ModelSource] = []
        problems: list[ScanProblem] = []
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            name = directory.name
            if name.startswith("."):
                continue
            try:
                validate_model_name(name)
                config, triton = _read_config(name, directory)
            except InvalidInput as exc:
                problems.append(ScanProblem(name, exc.message))
                continue
            model_file = triton.model_filename if triton else MODEL_FILE
            versions = {
                int(v.name): v / model_file
                for v in directory.iterdir()
                if v.is_dir() and v.name.isdigit() and (v / model_file).is_file()
            }
            if not versions:
                problems.append(
                    ScanProblem(name, f"no version directory holds {model_file} (<name>/<n>/)")
                )
                continue
            source = ModelSource(name, directory, config, versions)
            models.append(source)
        return models, problems


def _read_config(name: str, directory: Path) -> tuple[ModelConfig, TritonModelConfig | None]:
    """config.toml if there is one, else config.pbtxt, else the empty config."""
    toml, pbtxt = directory / CONFIG_FILE, directory / TRITON_CONFIG_FILE
    if pbtxt.is_file() and not toml.is_file():
        _announce(name, f"configuration from {pbtxt} (Triton format)")
        triton = load_triton_config(pbtxt, name)
        return triton.config, triton
    if pbtxt.is_file():
        _announce(name, f"both {CONFIG_FILE} and {TRITON_CONFIG_FILE}: using {toml}")
    return load_model_config(toml), None


def _announce(name: str, message: str) -> None:
    if (name, message) not in _announced:
        _announced.add((name, message))
        log.info("model '%s': %s", name, message)
