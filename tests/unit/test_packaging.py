"""What `pip install .` and `pip install ./client` put in place: every package folder under its
installed name, the client's requirements inside the server's, and our Open Inference Protocol
messages beside tritonclient's in one process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# Installed name -> the folder that holds it, as the design lays them out.
LAYOUT = {
    "inferd": ROOT / "server" / "inferd",
    "inferd.loadtest": ROOT / "loadtest",
    "inferd_client": ROOT / "client" / "inferd_client",
    "inferd_wire": ROOT / "client" / "inferd_wire",
}
CLIENT_TOPS = ("inferd_client", "inferd_wire")


def _pyproject(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


SERVER = _pyproject(ROOT / "pyproject.toml")
CLIENT = _pyproject(ROOT / "client" / "pyproject.toml")


def _packages_on_disk(tops: tuple[str, ...] = tuple(LAYOUT)) -> set[str]:
    """The installed name of every folder with an `__init__.py` under the layout's folders."""
    found: set[str] = set()
    for top in tops:
        folder = LAYOUT[top]
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            found.add(".".join((top, *parts)))
    return found


def _folder_of(package: str, package_dir: dict[str, str], base: Path) -> Path:
    """Where setuptools looks for `package`: the longest package-dir prefix, else base/<dots>."""
    parts = package.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return base / package_dir[prefix] / Path(*parts[cut:])
    return base / package_dir.get("", "") / Path(*parts)


def test_every_package_folder_is_listed_under_its_installed_name() -> None:
    listed = set(SERVER["tool"]["setuptools"]["packages"])
    on_disk = _packages_on_disk()
    assert sorted(on_disk - listed) == [], "package folders missing from pyproject.toml"
    assert sorted(listed - on_disk) == [], "pyproject.toml lists packages that are not there"


def test_package_dir_maps_each_listed_package_to_its_folder() -> None:
    setuptools = SERVER["tool"]["setuptools"]
    for package in setuptools["packages"]:
        top = max((t for t in LAYOUT if package == t or package.startswith(t + ".")), key=len)
        expected = LAYOUT[top] / Path(*package[len(top) :].split(".")[1:])
        folder = _folder_of(package, setuptools["package-dir"], ROOT)
        assert folder.resolve() == expected.resolve(), package
        assert (folder / "__init__.py").is_file(), package


def test_client_pyproject_lists_exactly_the_client_packages() -> None:
    listed = set(CLIENT["tool"]["setuptools"]["packages"])
    assert listed == _packages_on_disk(CLIENT_TOPS)
    package_dir = CLIENT["tool"]["setuptools"].get("package-dir", {})
    for package in listed:
        assert (_folder_of(package, package_dir, ROOT / "client") / "__init__.py").is_file()
    server_listed = set(SERVER["tool"]["setuptools"]["packages"])
    assert listed <= server_listed, "`pip install .` must carry the client's packages too"


def _requirements(project: dict[str, Any]) -> dict[str, Requirement]:
    parsed = [Requirement(text) for text in project["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in parsed}


def test_client_requirements_are_a_subset_of_the_servers() -> None:
    client, server = _requirements(CLIENT), _requirements(SERVER)
    assert sorted(set(client) - set(server)) == []
    # In step: the same bounds on both sides (the server carries the client's packages).
    for name, requirement in client.items():
        assert requirement.specifier == server[name].specifier, name
    assert not set(client) & {"onnxruntime", "onnxruntime-gpu", "pydantic", "opentelemetry-sdk"}


# Both orders: the second generated module to load must not collide with the first.
_ROUND_TRIP = """
import sys
import numpy as np

if sys.argv[1] == "ours-first":
    from inferd_wire.proto.inference import grpc_service_pb2 as ours
    from tritonclient.grpc import service_pb2 as theirs
else:
    from tritonclient.grpc import service_pb2 as theirs
    from inferd_wire.proto.inference import grpc_service_pb2 as ours


def request(module):
    message = module.ModelInferRequest(model_name="mlp", model_version="1", id="r1")
    tensor = message.inputs.add(name="input", datatype="FP32", shape=[2, 3])
    tensor.parameters["binary_data_size"].int64_param = 24
    message.outputs.add(name="output")
    message.parameters["priority"].uint64_param = 3
    message.raw_input_contents.append(np.arange(6, dtype=np.float32).tobytes())
    return message


for source, sink in ((ours, theirs), (theirs, ours)):
    sent = request(source)
    parsed = sink.ModelInferRequest.FromString(sent.SerializeToString())
    assert parsed == request(sink), (source.__name__, parsed)
    assert parsed.SerializeToString(deterministic=True) == sent.SerializeToString(
        deterministic=True
    )
    assert np.frombuffer(parsed.raw_input_contents[0], np.float32).tolist() == [0, 1, 2, 3, 4, 5]
assert ours.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
assert theirs.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
assert ours.ModelInferRequest is not theirs.ModelInferRequest
print("ok")
"""


@pytest.mark.parametrize("order", ["ours-first", "tritonclient-first"])
def test_tritonclient_and_our_oip_messages_load_together_and_agree_on_the_wire(
    order: str, tmp_path: Path
) -> None:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (it comes with the dev extra)")
    done = subprocess.run(
        [sys.executable, "-c", _ROUND_TRIP, order],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
