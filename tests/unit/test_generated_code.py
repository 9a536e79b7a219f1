"""The committed client/inferd_wire/proto/ must be exactly what protos/ generates: a stale stub
fails here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_protos", ROOT / "scripts" / "generate_protos.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["generate_protos"] = module
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh, committed = _tree(tmp_path), _tree(ROOT / "client" / "inferd_wire" / "proto")
    assert sorted(fresh) == sorted(committed), (
        "client/inferd_wire/proto/ has missing or extra files: run `make gen`"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, (
        f"client/inferd_wire/proto/ is stale against protos/ for {stale}: run `make gen`"
    )
