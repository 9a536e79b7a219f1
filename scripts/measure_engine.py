"""The engine of `inferd serve --workers N` alone: how many requests a second it serves, and its
CPU time per request, when frontends keep K requests in flight.

    .venv/bin/python scripts/measure_engine.py [--models tiny,mlp] [--in-flight 1,4,16,64]

It starts `inferd serve --workers 2` on the bench repository (loadtest/bench/repository.py)
and connects to the engine's socket as one more frontend would (workers/ipc.py: hello, then
"infer" frames of one row each), keeping K requests in flight: each answer sends the next
request. No gRPC is involved, so the figures are the engine's own: its request path (frames,
batcher, hand-off to the runtime, reply) and the model. The engine's CPU time is read from
/proc around the measured requests.

Why it exists: through the harness on this 2-core box the frontends cannot feed the engine
faster than one process serves, so the engine sees requests one at a time and pays a wake-up
for each; what it costs per request once many frontends feed it (the 16-core projection of
docs/benchmarks.md, "Workers") is measured here instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.server_process import start_inferd
from inferd.workers.ipc import Link, SharedTensors, pack_tensors

INPUTS = {"tiny": ("input", (1, 16)), "mlp": ("input", (1, 64))}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    run_dir: Path, engine: int, model: str, in_flight: int, requests: int
) -> dict[str, Any]:
    """`requests` one-row requests with `in_flight` outstanding; req/s and engine CPU."""
    loop = asyncio.get_running_loop()
    state = asyncio.Event()
    done = asyncio.Event()
    shared = SharedTensors("inferd-measure-")
    name, shape = INPUTS[model]
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    sent = answered = 0
    target = 0
    errors: list[Any] = []
    link: Link

    def send() -> None:
        nonlocal sent
        specs, body = pack_tensors([(name, x)], shared)
        sent += 1
        link.send(("infer", sent, model, None, 1, (), "", 0, None, None, specs), body)

    def on_frame(header: Any, body: bytes) -> None:
        nonlocal answered
        if header[0] == "state":
            state.set()
            return
        if header[0] == "error":
            errors.append(header)
        answered += 1
        if sent < target:
            send()
        if answered >= target:
            done.set()

    async def run(count: int) -> float:
        nonlocal sent, answered, target
        sent = answered = 0
        target = count
        done.clear()
        started = time.perf_counter()
        for _ in range(min(in_flight, count)):
            send()
        await done.wait()
        return time.perf_counter() - started

    _, link = await loop.create_unix_connection(
        lambda: Link(on_frame, lambda exc: None), str(run_dir / "engine.sock")
    )
    link.send(("hello", os.getpid()))
    await state.wait()
    await run(max(requests // 20, in_flight))  # warm-up
    cpu_before = cpu_seconds(engine)
    elapsed = await run(requests)
    cpu = cpu_seconds(engine) - cpu_before
    link.close()
    if errors:
        raise RuntimeError(f"the engine answered errors: {errors[:3]}")
    return {
        "model": model,
        "in_flight": in_flight,
        "requests": requests,
        "req_per_s": requests / elapsed,
        "engine_cpu_us_per_request": cpu / requests * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mlp")
    parser.add_argument("--in-flight", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="for the server"
    )
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    levels = [int(k) for k in args.in_flight.split(",")]
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="measure-engine-") as tmp:
        repository = build_bench_repository(Path(tmp) / "models")
        server = start_inferd(
            repository,
            Path(tmp) / "server.log",
            extra_args=["--workers", "2"],
            metrics=False,
            env=dict(item.split("=", 1) for item in args.env),
        )
        try:
            text = server.log_text()
            engine = int(re.findall(r"engine pid (\d+) holds", text)[-1])
            run_dir = Path(re.findall(r'"run_dir": "([^"]+)"', text)[-1])
            rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for _ in range(args.rounds):  # rounds interleave the levels
                for model in models:
                    for k in levels:
                        result = asyncio.run(drive(run_dir, engine, model, k, args.requests))
                        rows.setdefault((model, k), []).append(result)
        finally:
            server.stop()
    merged = []
    print(f"{'model':<6} {'in flight':>9} {'req/s':>8} {'engine CPU µs/request':>22}")
    for (model, k), results in rows.items():
        rate = float(np.median([r["req_per_s"] for r in results]))
        cpu = float(np.median([r["engine_cpu_us_per_request"] for r in results]))
        merged.append({"model": model, "in_flight": k, "req_per_s": rate, "engine_cpu_us": cpu})
        print(f"{model:<6} {k:>9} {rate:>8.0f} {cpu:>22.0f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"rounds": args.rounds, "env": args.env, "rows": merged}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
