"""Triton's load generator, `perf_analyzer`, set up here and run against inferd.

    python scripts/perf_analyzer.py -m mlp -i grpc -u 127.0.0.1:8001 --concurrency-range 1:4:3
    python scripts/perf_analyzer.py --install-only

The PyPI `perf-analyzer` wheels need glibc 2.38. The binary inside `tritonclient==2.51.0`'s
manylinux1 wheel runs on older systems once two shared libraries are on its library path:
`libb64.so.0d` (Debian's libb64-0d) and `libcudart.so.12` (PyPI's nvidia-cuda-runtime-cu12,
which loads without a GPU). Everything goes into a cache under .venv/ (reused by later runs);
libb64 comes from the system when present, else `apt-get install` (as root) or
`apt-get download` unpacked into the cache (otherwise).
"""

from __future__ import annotations

import argparse
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".venv" / "perf_analyzer"
TRITONCLIENT = "tritonclient==2.51.0"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12==12.9.79"
LIBB64_PACKAGE = "libb64-0d"
LIBB64 = "libb64.so.0d"
BINARY_IN_WHEEL = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", LIBB64_PACKAGE]
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

# What pip and apt print when a package source cannot be reached (as opposed to a real error).
UNREACHABLE_MARKERS = (
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "NewConnectionError",
    "Max retries exceeded",
    "Could not resolve",
    "Failed to fetch",
    "Unable to connect",
    "No matching distribution found",
)


class InstallError(RuntimeError):
    """A step of the set-up failed."""


class PackageSourceUnreachable(InstallError):
    """PyPI or Debian's archive could not be reached; nothing is wrong with the set-up itself."""


def _run(command: Sequence[str], what: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        list(command), capture_output=True, text=True, env=env, check=False, timeout=600
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        cls = (
            PackageSourceUnreachable
            if any(m in output for m in UNREACHABLE_MARKERS)
            else InstallError
        )
        raise cls(f"{what} failed ({' '.join(command)}):\n{output[-3000:]}")
    return output


def _binary(cache: Path) -> Path:
    binary = cache / "bin" / "perf_analyzer"
    if binary.is_file():
        return binary
    wheels = cache / "wheels"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    _run(
        [*pip, "--platform", "manylinux1_x86_64", "-d", str(wheels), TRITONCLIENT],
        f"downloading {TRITONCLIENT}",
    )
    (wheel,) = wheels.glob("tritonclient-2.51.0-*manylinux1_x86_64.whl")
    binary.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(BINARY_IN_WHEEL) as source:
        partial = binary.with_suffix(".partial")
        with open(partial, "wb") as target:
            shutil.copyfileobj(source, target)
    partial.chmod(0o755)
    partial.replace(binary)
    return binary


def _cudart(cache: Path) -> Path:
    target = cache / "cuda"
    found = glob.glob(str(target / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12*"))
    if not found:
        _run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
             "--upgrade", CUDA_RUNTIME],
            f"installing {CUDA_RUNTIME}",
        )  # fmt: skip
    return target / "nvidia" / "cuda_runtime" / "lib"


def _libb64(cache: Path) -> Path | None:
    """The directory holding libb64.so.0d, or None when the system's loader finds it."""
    if ctypes.util.find_library("b64") or Path("/usr/lib/x86_64-linux-gnu", LIBB64).exists():
        return None
    unpacked = cache / "libb64"
    found = list(unpacked.rglob(LIBB64))
    if found:
        return found[0].parent
    if shutil.which("apt-get") is None:
        raise InstallError(f"{LIBB64} is missing and apt-get is not available to fetch it")
    if os.geteuid() == 0:
        try:
            _run(APT_INSTALL, f"apt-get install {LIBB64_PACKAGE}", APT_ENV)
        except InstallError:
            _run(["apt-get", "update"], "apt-get update", APT_ENV)
            _run(APT_INSTALL, f"apt-get install {LIBB64_PACKAGE}", APT_ENV)
        return None
    downloads = cache / "debs"
    downloads.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["apt-get", "download", LIBB64_PACKAGE], cwd=downloads, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise PackageSourceUnreachable(f"apt-get download {LIBB64_PACKAGE}: {result.stderr}")
    for deb in downloads.glob(f"{LIBB64_PACKAGE}_*.deb"):
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)], f"unpacking {deb.name}")
    found = list(unpacked.rglob(LIBB64))
    if not found:
        raise InstallError(f"{LIBB64_PACKAGE} unpacked into {unpacked} holds no {LIBB64}")
    return found[0].parent


def install(cache: Path = CACHE) -> tuple[Path, dict[str, str]]:
    """(the perf_analyzer binary, the environment it runs in), fetching what is missing."""
    binary = _binary(cache)
    library_path = [str(_cudart(cache))]
    b64 = _libb64(cache)
    if b64 is not None:
        library_path.append(str(b64))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [*library_path, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    )
    missing = [
        line.strip()
        for line in _run(["ldd", str(binary)], "ldd perf_analyzer", env).splitlines()
        if "not found" in line
    ]
    if missing:
        raise InstallError(f"perf_analyzer still misses shared libraries: {missing}")
    return binary, env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument("--help-script", action="help", help="this help")
    args, perf_args = parser.parse_known_args(argv)
    binary, env = install()
    if args.install_only:
        print(binary)
        return 0
    return subprocess.run([str(binary), *perf_args], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
