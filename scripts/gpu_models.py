"""Reference models for the GPU check, exported with torch on the device by scripts/gpu_check.sh,
and the inferd repository that serves them.

    python3 scripts/gpu_models.py --out /tmp/inferd-gpu

writes OUT/models/{resnet50,bert}.onnx and OUT/repository/<model>/1/model.onnx (+ config.toml):

- resnet50: 4 execution slots, one shared session, batch buckets 1..128 (the CUDA default)
- resnet50_spi: the same, a session per slot (shared vs per slot, measured side by side)
- resnet50_graphs: CUDA graphs for buckets 1 and 8 (batch-1 latency)
- bert: sequence fixed at 128 by declaration, batch buckets 1..64

Random weights (no download): speed does not depend on them. `--stand-ins` writes the demo
CNN and text encoder under those names instead (no torch: rehearsing gpu_check.sh on a CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

RESNET_CONFIG = """\
max_batch_size = 128
max_queue_delay_us = 2000
max_queue_size = 4096
instances = 4
execution_providers = ["cuda", "cpu"]
"""

RESNET_SPI_CONFIG = RESNET_CONFIG + "session_per_instance = true\n"

RESNET_GRAPHS_CONFIG = """\
max_batch_size = 8
max_queue_delay_us = 0
instances = 2
execution_providers = ["cuda", "cpu"]
batch_buckets = [1, 8]
cuda_graphs = true
"""

BERT_CONFIG = """\
max_batch_size = 64
max_queue_delay_us = 2000
max_queue_size = 4096
instances = 4
execution_providers = ["cuda", "cpu"]
inputs = [
  { name = "input_ids", datatype = "INT64", dims = [128] },
  { name = "attention_mask", datatype = "INT64", dims = [128] },
]
"""


def export_resnet50(path: Path) -> None:
    import torch
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 224, 224),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def export_bert(path: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(BertConfig())

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output

    model = Encoder().eval()
    ids = torch.randint(0, 1000, (1, 128), dtype=torch.int64)
    mask = torch.ones(1, 128, dtype=torch.int64)
    seq = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        model,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["last_hidden_state", "pooler_output"],
        dynamic_axes={
            "input_ids": seq,
            "attention_mask": seq,
            "last_hidden_state": seq,
            "pooler_output": {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )


def place(source: Path, repository: Path, name: str, config: str) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / "model.onnx"
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
    (repository / name / "config.toml").write_text(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument("--stand-ins", action="store_true", help="demo models, no torch")
    args = parser.parse_args()
    models = args.out / "models"
    repository = args.out / "repository"
    models.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    resnet = models / "resnet50.onnx"
    if args.stand_ins:
        from inferd.demo_models import build_cnn, build_text_encoder

        resnet.write_bytes(build_cnn().SerializeToString())
        (models / "bert.onnx").write_bytes(build_text_encoder().SerializeToString())
    if not resnet.is_file():
        export_resnet50(resnet)
    print(f"resnet50 exported ({time.perf_counter() - started:.1f} s)", flush=True)
    place(resnet, repository, "resnet50", RESNET_CONFIG)
    place(resnet, repository, "resnet50_spi", RESNET_SPI_CONFIG)
    place(resnet, repository, "resnet50_graphs", RESNET_GRAPHS_CONFIG)
    if not args.skip_bert:
        bert = models / "bert.onnx"
        if not bert.is_file():
            export_bert(bert)
        print(f"bert exported ({time.perf_counter() - started:.1f} s)", flush=True)
        place(bert, repository, "bert", BERT_CONFIG)


if __name__ == "__main__":
    main()
