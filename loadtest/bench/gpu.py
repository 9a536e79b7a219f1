"""In-process ceilings on the GPU, batch-bucket padding cost, and the GPU report.

    python -m inferd.loadtest.bench.gpu ceiling --model resnet50.onnx --name resnet50 --out c.json
    python -m inferd.loadtest.bench.gpu padding --model models/cnn/1/model.onnx --max-batch 32
    python -m inferd.loadtest.bench.gpu report --ceiling c.json --served M=DIR ... --out summary.md

`ceiling` runs ONNX Runtime directly (no server, no RPC): per batch size, numpy in and out, IO
binding with the data already on the device, and IO binding with the copies serving must pay
(host in, host out); then several threads on one shared session and on a session each, and
CUDA graph replay. The best items/s is what inferd's served
throughput is judged against, in the same run on the same machine.

`padding` measures what batch buckets cost where the model runs: inferd's own runtime on the
same sequence of random batch sizes, with and without buckets, interleaved.

`report` writes the markdown table: served rows/s (from `python -m inferd.loadtest`
report.json files) as a fraction of the in-process best, and batch-1 latencies; a run given as
`--served MODEL@N=DIR` was served by `inferd serve --workers N` and gets a target row of its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass
class Measurement:
    model: str
    mode: str
    batch: int
    threads: int
    sessions: int
    items_per_s: float
    p50_ms: float
    runs: int


def providers_for(device: str, graphs: bool = False) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    options: dict[str, str] = {"cudnn_conv_algo_search": "HEURISTIC"}
    if graphs:
        options["enable_cuda_graph"] = "1"
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def open_session(path: Path, device: str, graphs: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers_for(device, graphs))


def inputs_for(
    session: ort.InferenceSession, batch: int, seq: int, seed: int = 0
) -> dict[str, Any]:
    """Random inputs: dim 0 = batch, other variable dims = seq (token ids below 1000)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        shape = [batch] + [d if isinstance(d, int) and d > 0 else seq for d in spec.shape[1:]]
        dtype = TYPES[spec.type]
        if np.issubdtype(dtype, np.integer):
            feeds[spec.name] = (
                np.ones(shape, dtype)
                if "mask" in spec.name
                else rng.integers(0, 1000, shape).astype(dtype)
            )
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def timed(
    runs: Sequence[Callable[[], None]], seconds: float, warm: int = 3
) -> tuple[int, float, float]:
    """One thread per callable, each calling its own until the deadline: (runs, seconds,
    median ms)."""
    for run in runs:
        for _ in range(warm):
            run()
    latencies: list[list[float]] = [[] for _ in runs]
    start = threading.Barrier(len(runs) + 1)
    deadline = [0.0]

    def worker(run: Callable[[], None], mine: list[float]) -> None:
        start.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline[0]:
                return
            run()
            mine.append(time.perf_counter() - t0)

    pool = [
        threading.Thread(target=worker, args=pair) for pair in zip(runs, latencies, strict=True)
    ]
    for t in pool:
        t.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - began
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, statistics.median(flat) * 1e3 if flat else float("nan")


class Runner:
    """One way to run a batch on one session; `__call__` is one run."""

    def __init__(self, session: ort.InferenceSession, feeds: dict[str, Any], mode: str) -> None:
        self.session = session
        self.feeds = feeds
        self.mode = mode
        self.names = [o.name for o in session.get_outputs()]
        device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        if mode == "numpy":
            return
        self.binding = session.io_binding()
        self.options = ort.RunOptions()
        if mode == "iobinding-device":
            # The ceiling proper: inputs already on the device, outputs left there.
            self.device_inputs = {
                k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feeds.items()
            }
            for name, value in self.device_inputs.items():
                self.binding.bind_ortvalue_input(name, value)
            for name in self.names:
                self.binding.bind_output(name, device, 0)
        elif mode == "graph":
            plain = ort.RunOptions()
            plain.add_run_config_entry("gpu_graph_id", "-1")
            outputs = session.run(None, feeds, plain)
            self.device_inputs = {
                k: ort.OrtValue.ortvalue_from_numpy(v, device, 0) for k, v in feeds.items()
            }
            self.device_outputs = [
                ort.OrtValue.ortvalue_from_shape_and_type(list(o.shape), o.dtype, device, 0)
                for o in outputs
            ]
            for name, value in self.device_inputs.items():
                self.binding.bind_ortvalue_input(name, value)
            for name, value in zip(self.names, self.device_outputs, strict=True):
                self.binding.bind_ortvalue_output(name, value)
            self.options.add_run_config_entry("gpu_graph_id", "1")
        else:  # "iobinding-host": what serving pays, host in and host out
            for name, array in feeds.items():
                self.binding.bind_input(
                    name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data
                )
            for name in self.names:
                self.binding.bind_output(name, device, 0)

    def __call__(self) -> None:
        if self.mode == "numpy":
            self.session.run(self.names, self.feeds)
            return
        if self.mode == "graph":
            for name, value in self.device_inputs.items():
                value.update_inplace(self.feeds[name])
        self.session.run_with_iobinding(self.binding, self.options)
        if self.mode in ("iobinding-host", "graph"):
            self.binding.copy_outputs_to_cpu()


def ceiling(args: argparse.Namespace) -> list[Measurement]:
    path = Path(args.model)
    results: list[Measurement] = []
    shared = open_session(path, args.device)
    print(f"{args.name}: providers {shared.get_providers()}", flush=True)

    def measure(mode: str, batch: int, threads: int, sessions: list[ort.InferenceSession]) -> None:
        feeds = inputs_for(shared, batch, args.seq)
        runners = [Runner(sessions[i % len(sessions)], feeds, mode) for i in range(threads)]
        runs, elapsed, p50 = timed(runners, args.seconds)
        m = Measurement(
            args.name, mode, batch, threads, len(sessions), runs * batch / elapsed, p50, runs
        )
        results.append(m)
        print(
            f"  {mode:17s} batch {batch:4d} threads {threads} sessions {len(sessions)}: "
            f"{m.items_per_s:9.1f} items/s  p50 {p50:7.2f} ms",
            flush=True,
        )

    for batch in args.batches:
        for mode in args.modes:
            measure(mode, batch, 1, [shared])
    per_thread: list[ort.InferenceSession] = []
    for threads in [t for t in args.threads if t > 1]:
        while len(per_thread) < threads:
            per_thread.append(open_session(path, args.device))
        for batch in args.thread_batches:
            for mode in ("numpy", "iobinding-host"):
                measure(mode, batch, threads, [shared])
                measure(mode, batch, threads, per_thread[:threads])
    if args.device == "cuda":
        for batch in args.graph_batches:
            # One session per graph: a graph replays one set of buffers.
            try:
                measure("graph", batch, 1, [open_session(path, args.device, graphs=True)])
            except Exception as exc:  # report and go on: the other figures still stand
                print(f"  graph batch {batch}: failed: {exc}", flush=True)
    return results


def padding(args: argparse.Namespace) -> dict[str, Any]:
    """inferd's runtime on the same random batch sizes with buckets on and off: one session,
    its buckets switched batch by batch (order alternating), so that both see the same
    threads, caches and machine noise."""
    from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
    from inferd.core.runtime.buckets import default_buckets
    from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers

    path = Path(args.model)
    providers = resolve_providers(["cuda", "cpu"] if args.device == "cuda" else ["cpu"], {})
    buckets = tuple(args.buckets) if args.buckets else default_buckets(args.max_batch)
    config = ModelConfig(max_batch_size=args.max_batch, batch_buckets=buckets)
    s = OnnxRuntimeSession(
        path, providers, effective=EffectiveConfig.merge(config, ModelDefaults())
    )
    buckets = s.buckets
    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(1, args.max_batch + 1, args.batches_per_round).tolist()
    reader = open_session(path, "cpu")
    requests = {n: inputs_for(reader, n, args.seq, seed=n) for n in set(sizes)}
    modes = {"no buckets": (), f"buckets {list(buckets)}": buckets}
    totals = dict.fromkeys(modes, 0.0)
    for label in modes:
        s.buckets = modes[label]
        for n in sorted(set(sizes)):
            s.run_batch([requests[n]], ())
    order = list(modes)
    for _ in range(args.rounds):
        for n in sizes:
            for label in order:
                s.buckets = modes[label]
                t0 = time.perf_counter()
                s.run_batch([requests[n]], ())
                totals[label] += time.perf_counter() - t0
            order.reverse()
    device = s.providers[0]
    s.close()
    rows = sum(sizes) * args.rounds
    base = totals["no buckets"]
    report = {
        "model": args.name or path.parent.parent.name,
        "device": device,
        "max_batch_size": args.max_batch,
        "buckets": list(buckets),
        "batches": len(sizes) * args.rounds,
        "rows": rows,
        "padded_rows": sum((next((b for b in buckets if b >= n), n) - n) for n in sizes)
        * args.rounds,
        "rows_per_s": {label: rows / t for label, t in totals.items()},
        "time_ratio_buckets_vs_none": {label: t / base for label, t in totals.items()},
    }
    print(json.dumps(report, indent=1))
    return report


def _served_levels(report_path: Path) -> list[dict[str, Any]]:
    """Every (target, level) of a `python -m inferd.loadtest` report.json, flattened."""
    data = json.loads(report_path.read_text())
    rows: list[dict[str, Any]] = []
    for target in data.get("targets", []):
        for level in target.get("levels", []):
            rows.append(
                {
                    "target": target["name"],
                    "level": level["level"],
                    "client_batch": level["client_batch"],
                    "rows_per_s": level["rows_per_s"],
                    "p50_ms": level["latency_ms"]["p50_ms"],
                    "p99_ms": level["latency_ms"]["p99_ms"],
                    "errors": level.get("error_count", 0),
                }
            )
    return rows


# The GPU targets: served ÷ in-process (the ceiling measured on the device), and batch-1 latency
# with CUDA graphs.
THROUGHPUT_TARGETS = {"resnet50": 0.8, "bert": 0.9}
BATCH1_GRAPHS_P50_MS = 1.3


def report(args: argparse.Namespace) -> str:
    ceilings: list[dict[str, Any]] = []
    for path in args.ceiling:
        ceilings += json.loads(Path(path).read_text())["measurements"]
    best: dict[str, float] = {}
    host: dict[str, float] = {}
    graph_p50: dict[tuple[str, int], float] = {}
    for m in ceilings:
        if m["mode"] == "graph":
            graph_p50[(m["model"], m["batch"])] = m["p50_ms"]
        else:
            best[m["model"]] = max(best.get(m["model"], 0.0), m["items_per_s"])
        if m["mode"] in ("numpy", "iobinding-host"):
            host[m["model"]] = max(host.get(m["model"], 0.0), m["items_per_s"])
    served: list[dict[str, Any]] = []
    missing: list[str] = []
    for spec in args.served:
        model, _, where = spec.partition("=")
        # MODEL@N: a server run with `--workers N` (judged on a row of its own).
        model, _, workers = model.partition("@")
        path = Path(where) / "report.json"
        if not path.is_file():
            missing.append(f"{model}: no report in {where}")
            continue
        for row in _served_levels(path):
            served.append(
                {"model": model, "run": Path(where).name, "workers": int(workers or 1), **row}
            )

    nan = float("nan")
    lines = ["## Targets (served ÷ in-process, same run, same machine)", ""]
    lines += ["| target | measured | goal | met |", "|---|---|---|---|"]
    for model, goal in THROUGHPUT_TARGETS.items():
        counts = sorted({r["workers"] for r in served if r["model"] == model} | {1})
        for workers in counts:
            clean = [
                r
                for r in served
                if r["model"] == model and r["workers"] == workers and not r["errors"]
            ]
            top = max(clean, key=lambda r: r["rows_per_s"], default=None)
            what = f"{model} served" + (f" with --workers {workers}" if workers > 1 else "")
            if top is None or model not in best:
                lines.append(f"| {what} ÷ in-process best | not measured | ≥ {goal} | - |")
                continue
            ratio = top["rows_per_s"] / best[model]
            lines.append(
                f"| {what} ÷ in-process best ({top['rows_per_s']:,.0f} ÷ {best[model]:,.0f} "
                f"items/s; {top['target']} {top['level']} x{top['client_batch']}) | {ratio:.2f} "
                f"| ≥ {goal} | {'yes' if ratio >= goal else 'NO'} |"
            )
    batch1 = [
        r
        for r in served
        if r["target"] == "cuda-graphs" and r["client_batch"] == 1 and r["level"] == "c=1"
    ]
    if batch1 and not batch1[0]["errors"]:
        p50 = batch1[0]["p50_ms"]
        lines.append(
            f"| resnet50 batch-1 p50 served with CUDA graphs (in-process graph replay "
            f"{graph_p50.get(('resnet50', 1), nan):.2f} ms) | {p50:.2f} ms "
            f"| ≤ {BATCH1_GRAPHS_P50_MS} ms | {'yes' if p50 <= BATCH1_GRAPHS_P50_MS else 'NO'} |"
        )
    else:
        lines.append(
            "| resnet50 batch-1 p50 with CUDA graphs | not measured "
            f"| ≤ {BATCH1_GRAPHS_P50_MS} ms | - |"
        )

    lines += ["", "## Served (inferd, closed loop)", ""]
    lines += [
        "| model | run | target | level | rows/s | ÷ in-process best "
        "| ÷ in-process with host copies | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in served:
        rows = r["rows_per_s"]
        lines.append(
            f"| {r['model']} | {r['run']} | {r['target']} | {r['level']} x{r['client_batch']} "
            f"| {rows:,.0f} | {rows / best.get(r['model'], nan):.2f} "
            f"| {rows / host.get(r['model'], nan):.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['errors']} |"
        )
    lines += [f"| {m} | | | | | | | | | |" for m in missing]

    lines += ["", "## In-process ceiling (ONNX Runtime, no server)", ""]
    lines += [
        "| model | mode | batch | threads | sessions | items/s | p50 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in ceilings:
        lines.append(
            f"| {m['model']} | {m['mode']} | {m['batch']} | {m['threads']} | {m['sessions']} "
            f"| {m['items_per_s']:,.0f} | {m['p50_ms']:.2f} |"
        )
    lines += [
        "",
        "Modes: numpy = `session.run` on host arrays; iobinding-device = inputs already on the "
        "GPU, outputs left there (the in-process ceiling); iobinding-host = host inputs bound, "
        "outputs copied back (what serving must pay); graph = CUDA graph replay with host "
        "copies.",
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"ceiling": ceilings, "served": served}, indent=1)
    )
    print(text)
    return text


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inferd.loadtest.bench.gpu", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("ceiling", help="in-process items/s per batch, mode and threads")
    c.add_argument("--model", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    c.add_argument("--batches", type=_ints, default=[1, 8, 32, 128])
    c.add_argument(
        "--modes",
        type=lambda t: t.split(","),
        default=["numpy", "iobinding-device", "iobinding-host"],
    )
    c.add_argument("--threads", type=_ints, default=[4])
    c.add_argument("--thread-batches", type=_ints, default=[32])
    c.add_argument("--graph-batches", type=_ints, default=[1, 8])
    c.add_argument("--seq", type=int, default=128, help="size of variable non-batch dims")
    c.add_argument("--seconds", type=float, default=2.0)
    c.add_argument("--out", required=True)
    p = sub.add_parser("padding", help="inferd runtime with vs without batch buckets")
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cpu")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--buckets", type=_ints, default=[])
    p.add_argument("--batches-per-round", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    r = sub.add_parser("report", help="markdown: served vs in-process")
    r.add_argument("--ceiling", action="append", default=[], help="ceiling JSON (repeatable)")
    r.add_argument(
        "--served",
        action="append",
        default=[],
        help="MODEL=DIR of a loadtest run (MODEL@N=DIR: a server with --workers N)",
    )
    r.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "ceiling":
        measurements = ceiling(args)
        Path(args.out).write_text(
            json.dumps(
                {
                    "onnxruntime": ort.__version__,
                    "device": args.device,
                    "model_file": str(args.model),
                    "measurements": [asdict(m) for m in measurements],
                },
                indent=1,
            )
        )
    elif args.command == "padding":
        result = padding(args)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    else:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
