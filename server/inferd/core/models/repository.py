"""The model repository on disk: `<root>/<model>/<version>/model.onnx`, numeric versions, and an
optional `<root>/<model>/config.toml` (inferd's) or `config.pbtxt` (Triton's; config.toml wins
when both exist).

What a scan cannot use is skipped and reported as a `RepositoryProblem`, never raised: one odd
directory must not stop the other models from loading, polling or starting."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from inferd.core.errors import InvalidInput, quoted
from inferd.core.models.config import ModelConfig, load_model_config
from inferd.core.models.triton_config import TritonModelConfig, load_triton_config
from inferd.core.observer import RepositoryProblem

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
TRITON_CONFIG_FILE = "config.pbtxt"
WARMUP_DIRECTORY = "warmup"

# (model, file) pairs whose choice of configuration file has been logged: rescans stay quiet.
_announced: set[tuple[str, str]] = set()

# No path separators, no "..", no hidden names: a model name is also a directory name.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_MODEL_NAME_RULE = (
    "use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit, without '..'"
)

# A version directory is 1 to 18 ASCII digits, so that every version fits the wire: int64 in
# inferd.v1 (18 digits always do, 19 not always) and a decimal string in the Open Inference
# Protocol. `str.isdigit()` is not the rule: it takes '²', which int() refuses.
VERSION_NAME = re.compile(r"[0-9]{1,18}")
MAX_VERSION = 10**18 - 1

# Problems that skip the whole model; the others skip one entry of it.
MODEL_PROBLEMS = frozenset({"invalid_name", "unreadable", "config", "no_version"})


def validate_model_name(name: str) -> None:
    if not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(f"model name {quoted(name)} is invalid: {_MODEL_NAME_RULE}")


def printable(name: str) -> str:
    """A file name as text safe for logs, metric labels and messages: bytes that are not UTF-8
    as `\\xNN`, control characters escaped, at most 256 characters."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= 256 else f"{text[:253]}..."


def repository_relative(text: str, root: Path) -> str:
    """`text` with the repository's own location cut from every path in it: reasons go to
    clients, which need the model's path inside the repository, not the server's directories."""
    for prefix in dict.fromkeys((str(root), os.path.realpath(root))):
        text = text.replace(prefix + os.sep, "")
    return text


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


class ModelRepository:
    def __init__(self, root: Path) -> None:
        # Absolute, so that reasons can always be made relative to it.
        self.root = root.absolute()

    def scan(self) -> tuple[list[ModelSource], list[RepositoryProblem]]:
        """Read every model directory. Blocks on file I/O: call it off the event loop. Raises
        only when the repository itself cannot be listed."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        models: list[ModelSource] = []
        problems: list[RepositoryProblem] = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith("."):
                continue
            try:
                if not directory.is_dir():
                    continue
                source = self._scan_model(directory, problems)
            except OSError as exc:
                reason = f"cannot be read: {exc.strerror or type(exc).__name__}"
                problems.append(self._problem(directory, "unreadable", reason))
                continue
            except Exception as exc:  # e.g. a config.toml that is not UTF-8: this model only
                reason = repository_relative(f"cannot be read: {exc}", self.root)
                problems.append(self._problem(directory, "unreadable", reason))
                continue
            if source is not None:
                models.append(source)
        return models, problems

    def _scan_model(self, directory: Path, problems: list[RepositoryProblem]) -> ModelSource | None:
        name = directory.name
        if not _MODEL_NAME.fullmatch(name) or ".." in name:
            problems.append(
                self._problem(directory, "invalid_name", f"not a model name: {_MODEL_NAME_RULE}")
            )
            return None
        try:
            config, triton = _read_config(name, directory)
        except InvalidInput as exc:
            problems.append(
                self._problem(directory, "config", repository_relative(exc.message, self.root))
            )
            return None
        model_file = triton.model_filename if triton else MODEL_FILE
        versions = self._versions(directory, model_file, problems)
        if not versions:
            problems.append(
                self._problem(
                    directory, "no_version", f"no version directory holds {model_file} (<n>/)"
                )
            )
            return None
        return ModelSource(name, directory, config, versions)

    def _versions(
        self, directory: Path, model_file: str, problems: list[RepositoryProblem]
    ) -> dict[int, Path]:
        """The model's version directories that hold its model file, by number. Hidden
        entries (a publisher's staging directory), the warm-up directory and files other than
        a would-be version are the model's own business, and pass silently."""
        spellings: dict[int, list[str]] = {}
        for entry in sorted(directory.iterdir()):
            name = entry.name
            if name.startswith(".") or name == WARMUP_DIRECTORY:
                continue
            is_dir = entry.is_dir()
            if VERSION_NAME.fullmatch(name):
                if not is_dir:
                    problems.append(
                        self._problem(entry, "not_a_version", "a file, not a version directory")
                    )
                elif (entry / model_file).is_file():
                    spellings.setdefault(int(name), []).append(name)
                # A version directory without its model file is still being written.
            elif is_dir:
                problems.append(self._problem(entry, "not_a_version", _not_a_version(name)))
        versions: dict[int, Path] = {}
        for number, names in spellings.items():
            # '7' and '007' are both version 7: the plain spelling serves, else the first.
            kept = str(number) if str(number) in names else names[0]
            versions[number] = directory / kept / model_file
            for other in names:
                if other != kept:
                    reason = f"also version {number}, which '{kept}' provides"
                    problems.append(self._problem(directory / other, "duplicate_version", reason))
        return versions

    def _problem(self, path: Path, kind: str, reason: str) -> RepositoryProblem:
        relative = path.relative_to(self.root)
        return RepositoryProblem(
            model=printable(relative.parts[0]),
            path=printable(str(relative)),
            kind=kind,
            reason=reason,
        )


def _not_a_version(name: str) -> str:
    if name.isascii() and name.isdigit():
        return f"{len(name)} digits: version numbers have at most 18 (they must fit int64)"
    return "not a version directory: versions are named with 1 to 18 digits 0-9"


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
