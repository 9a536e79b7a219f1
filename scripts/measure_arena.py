"""What each `cpu_memory_arena` setting costs small batches and what it returns after a large
request, on the demo models, through inferd's own `OnnxRuntimeSession` (CPU provider).

Each setting runs in a fresh subprocess (RSS is per process and the arena lives as long as its
session), in rounds that alternate the settings; figures are the median over rounds. A child:

1. loads the demo `text_encoder` and runs one small request: RSS "before";
2. runs one large request (default [32, 16384] int64 ids and mask: 8 MiB sent, ~0.5 GB of
   float intermediates inside the graph): "peak" is the process's VmHWM, "after" its VmRSS
   once the outputs are dropped; then the same request again (what a warm arena saves; "after
   2nd"), and five small requests ("+small");
3. loads the demo `mlp` and `cnn` and times small batches (`run_batch`, the server's path):
   batches per second over a fixed count, best of three.

Times are the process's CPU time (`time.process_time`, page faults included), not wall time: on
a shared machine, wall time measured other processes as much as the setting. With the default
`--threads 1` ONNX Runtime computes on the calling thread, so CPU time is the run's time.

It sets the default of `cpu_memory_arena` (server/inferd/core/models/config.py); the figures are
in docs/operations.md:
    .venv/bin/python scripts/measure_arena.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SETTINGS = ("keep", "shrink", "off")
SMALL = (("mlp", 1, 3000), ("mlp", 8, 3000), ("cnn", 8, 300))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(setting: str, rows: int, sequence: int, threads: int) -> dict[str, Any]:
    from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
    from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
    from inferd.demo_models import build_cnn, build_mlp, build_text_encoder, write_model

    cpu = resolve_providers(["cpu"], {})
    effective = EffectiveConfig.merge(
        ModelConfig(cpu_memory_arena=setting),  # type: ignore[arg-type]
        ModelDefaults(max_batch_size=max(rows, 64)),
    )
    result: dict[str, Any] = {"setting": setting}
    with tempfile.TemporaryDirectory() as root:
        repo = Path(root)
        for name, build in (("text_encoder", build_text_encoder), ("mlp", build_mlp)):
            write_model(build(), repo, name)
        write_model(build_cnn(), repo, "cnn")

        def session(name: str) -> OnnxRuntimeSession:
            return OnnxRuntimeSession(
                repo / name / "1" / "model.onnx", cpu, threads, effective=effective
            )

        def text(r: int, s: int) -> dict[str, np.ndarray]:
            ids = np.random.default_rng(0).integers(0, 1000, (r, s), dtype=np.int64)
            return {"input_ids": ids, "attention_mask": np.ones((r, s), np.int64)}

        encoder = session("text_encoder")
        small = text(1, 16)
        encoder.run_batch([small], ())
        result["rss_before"] = _status_mib("VmRSS")
        large = text(rows, sequence)
        for key in ("large_first_s", "large_second_s"):
            started = time.process_time()
            run = encoder.run_batch([large], ())
            result[key] = time.process_time() - started
            del run
            if key == "large_first_s":
                result["rss_peak"] = _status_mib("VmHWM")
                result["rss_after"] = _status_mib("VmRSS")
            else:
                result["rss_after_second"] = _status_mib("VmRSS")
        del large
        for _ in range(5):
            encoder.run_batch([small], ())
        result["rss_after_small"] = _status_mib("VmRSS")
        encoder.close()

        rng = np.random.default_rng(1)
        for name, batch, count in SMALL:
            s = session(name)
            spec = s.signature.inputs[0]
            request = {spec.name: rng.standard_normal((batch, *spec.dims)).astype(np.float32)}
            for _ in range(count // 10):
                s.run_batch([request], ())
            best = 0.0
            for _ in range(3):
                started = time.process_time()
                for _ in range(count):
                    s.run_batch([request], ())
                best = max(best, count / (time.process_time() - started))
            result[f"{name}_b{batch}_per_s"] = best
            s.close()
    return result


def parent(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in args.settings}
    for _ in range(args.rounds):
        for setting in args.settings:
            command = [
                sys.executable,
                __file__,
                "--child",
                setting,
                "--rows",
                str(args.rows),
                "--sequence",
                str(args.sequence),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[setting].append(json.loads(out.splitlines()[-1]))
    keys = [k for k in runs[args.settings[0]][0] if k != "setting"]
    median = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    print(
        f"text_encoder large request [{args.rows}, {args.sequence}], intra_op_threads "
        f"{args.threads}, median of {args.rounds} round(s); CPU time; RSS in MiB"
    )
    throughput = [f"{name}_b{batch}_per_s" for name, batch, _ in SMALL]
    print(
        f"{'setting':<8} {'mlp b1/s':>9} {'mlp b8/s':>9} {'cnn b8/s':>9} {'large 1st':>10} "
        f"{'large 2nd':>10} {'before':>7} {'peak':>7} {'after':>7} {'after 2nd':>9} {'+small':>7}"
    )
    for setting, m in median.items():
        print(
            f"{setting:<8} "
            + " ".join(f"{m[k]:>9.0f}" for k in throughput)
            + f" {m['large_first_s'] * 1e3:>8.0f}ms {m['large_second_s'] * 1e3:>8.0f}ms"
            + f" {m['rss_before']:>7.0f} {m['rss_peak']:>7.0f} {m['rss_after']:>7.0f}"
            + f" {m['rss_after_second']:>9.0f} {m['rss_after_small']:>7.0f}"
        )
    if "keep" not in median:
        return
    keep = median["keep"]
    print("\nratios: throughput and large-request time, setting / keep; RSS / RSS before")
    for setting, m in median.items():
        print(
            f"{setting:<8} "
            + " ".join(f"{k.removesuffix('_per_s')} {m[k] / keep[k]:.2f}" for k in throughput)
            + f"  large 1st {m['large_first_s'] / keep['large_first_s']:.2f}"
            + f" 2nd {m['large_second_s'] / keep['large_second_s']:.2f}  RSS"
            + "".join(
                f" {label} {m[k] / m['rss_before']:.2f}"
                for label, k in (
                    ("peak", "rss_peak"),
                    ("after", "rss_after"),
                    ("after-2nd", "rss_after_second"),
                    ("+small", "rss_after_small"),
                )
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=32, help="large request's rows")
    parser.add_argument("--sequence", type=int, default=16384, help="large request's length")
    parser.add_argument("--threads", type=int, default=1, help="intra_op_threads (0: cores)")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.sequence, args.threads)))
    else:
        parent(args)


if __name__ == "__main__":
    main()
