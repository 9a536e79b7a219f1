"""The model repository on disk: `<root>/<model>/<version>/model.onnx`, numeric versions, and an
optional `<root>/<model>/config.toml`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from server.core.errors import InvalidInput
from server.core.model_config import ModelConfig, load_model_config

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"

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
                config = load_model_config(directory / CONFIG_FILE)
            except InvalidInput as exc:
                problems.append(ScanProblem(name, exc.message))
                continue
            versions = {
                int(v.name): v / MODEL_FILE
                for v in directory.iterdir()
                if v.is_dir() and v.name.isdigit() and (v / MODEL_FILE).is_file()
            }
            if not versions:
                problems.append(
                    ScanProblem(name, f"no version directory holds {MODEL_FILE} (<name>/<n>/)")
                )
                continue
            models.append(ModelSource(name, directory, config, versions))
        return models, problems
