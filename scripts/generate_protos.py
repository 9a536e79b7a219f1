"""Generate the Python protobuf/gRPC modules from protos/ into client/inferd_wire/proto/.

The generated modules are committed so that `pip install .` and `pip install ./client` need no
code generator; `tests/unit/test_generated_code.py` regenerates into a temporary directory and
fails when the committed files differ (stale against protos/).

protoc names a generated module after its .proto path (`inference/grpc_service.proto` becomes
the top-level module `inference.grpc_service_pb2`) and registers every message in protobuf's
process-wide default descriptor pool. Both clash with tritonclient, whose generated code also
defines the proto package `inference`. So the output is adjusted in two ways, leaving the proto
packages (the wire names) untouched:

- imports between generated modules are made absolute under `inferd_wire.proto`;
- the Open Inference Protocol's messages (proto package `inference`) are registered in inferd's
  own pool (`inferd_wire.pool.POOL`), so `inference.*` symbols from both projects can be loaded
  in one process. `inferd.v1` stays in the default pool: its names are ours alone, and a
  message there can hold well-known types (Timestamp) built by any code.

protoletariat does the first rewrite, but it requires protobuf<6 (this project needs 7), and
nothing does the second; both are plain text substitutions over protoc's stable output.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "inferd_wire.proto"
OUT = ROOT / "client" / "inferd_wire" / "proto"

# Proto packages whose messages go to inferd's own descriptor pool (see the module docstring).
OWN_POOL_PACKAGES = ("inference",)
_DEFAULT_POOL = "_descriptor_pool.Default()"
_POOL_IMPORT = "from inferd_wire.pool import POOL as _INFERD_POOL\n"


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *protos,
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    top_packages = sorted({Path(proto).parts[0] for proto in protos})
    imports = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, top_packages))})\b", re.M)
    for module in sorted(out_dir.rglob("*.py*")):
        text = imports.sub(rf"\1 {PACKAGE}.\2", module.read_text())
        own_pool = module.relative_to(out_dir).parts[0] in OWN_POOL_PACKAGES
        if own_pool and module.suffix == ".py" and _DEFAULT_POOL in text:
            text = text.replace(_DEFAULT_POOL, "_INFERD_POOL")
            marker = "# @@protoc_insertion_point(imports)\n"
            text = text.replace(marker, _POOL_IMPORT + marker, 1)
        module.write_text(text)
    # Every folder holding generated modules becomes a regular package.
    (out_dir / "__init__.py").write_text(
        '"""Generated from protos/ by scripts/generate_protos.py."""\n'
    )
    for proto in protos:
        package = out_dir / Path(proto).parent
        while package != out_dir:
            (package / "__init__.py").touch()
            package = package.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    generate(parser.parse_args(argv).out)


if __name__ == "__main__":
    main(sys.argv[1:])
