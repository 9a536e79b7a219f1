"""Writes the model files of this Triton-style repository (`<model>/1/model.onnx`) next to the
committed `config.pbtxt` files, from inferd's demo model builders; or into another directory
(`--out`), with copies of the configurations.

    python examples/triton_repository/build.py
    inferd serve --model-repository examples/triton_repository
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

from inferd.demo_models import build_echo_bytes, build_mlp, build_text_encoder, write_model

HERE = Path(__file__).resolve().parent
CONFIG_FILE = "config.pbtxt"
MODELS = {"mlp": build_mlp, "text_encoder": build_text_encoder, "echo_bytes": build_echo_bytes}


def build_triton_repository(out: Path = HERE) -> list[str]:
    """Every model of the example (model.onnx, and config.pbtxt when `out` is elsewhere)."""
    out = Path(out)
    for name, build in MODELS.items():
        write_model(build(), out, name)
        source = HERE / name / CONFIG_FILE
        if (out / name).resolve() != source.parent:
            shutil.copyfile(source, out / name / CONFIG_FILE)
    return list(MODELS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="repository directory")
    out: Path = parser.parse_args(argv).out
    for name in build_triton_repository(out):
        print(f"{name}: {out / name / '1' / 'model.onnx'}")


if __name__ == "__main__":
    main()
