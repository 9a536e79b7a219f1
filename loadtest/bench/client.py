"""`python -m inferd.loadtest.bench.client`: what the client library (`inferd_client`) adds to a
call, against a raw generated stub call with a request built once.

One inferd (started on the bench repository through the shared server helper, or `--target`),
one caller, calls one after another: `InferClient.infer` (numpy in, numpy out) against
`predict_pb2_grpc.PredictStub(channel).Predict(request)`, then `AsyncInferClient.infer` against
the grpc.aio stub. The two kinds alternate in blocks (the first of a block swaps each time), so
drift on a shared machine hurts both alike. Prints the figures and writes the "Client cost"
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np

from inferd.loadtest.bench import PROJECT_ROOT
from inferd.loadtest.bench.costs import CallCost, ClientBenchmark
from inferd.loadtest.bench.document import CLIENT_HEADING, client_cost_section, write_section
from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.inputs import build_payloads
from inferd.loadtest.server_process import start_inferd
from inferd.loadtest.targets.native import NativeDriver, encode_predict_request
from inferd.loadtest.targets.target import TargetSpec, require_loopback
from inferd_client import AsyncInferClient, InferClient
from inferd_client._common import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from inferd_wire.proto.inferd.v1 import predict_pb2, predict_pb2_grpc

Timed = tuple[float, float]


def _sync_block(call: Callable[[], object], calls: int) -> Timed:
    """(wall s, process CPU s) of `calls` calls in a row."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        call()
    return time.perf_counter() - wall, time.process_time() - cpu


async def _async_block(call: Callable[[], Awaitable[object]], calls: int) -> Timed:
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await call()
    return time.perf_counter() - wall, time.process_time() - cpu


def _interleave(blocks: int) -> list[tuple[bool, ...]]:
    """Per block, the order of (client, raw): True is the client; the first swaps each block."""
    return [(True, False) if b % 2 == 0 else (False, True) for b in range(blocks)]


def _cost(api: str, caller: str, raw: bool, calls: int, timed: list[Timed]) -> CallCost:
    return CallCost(
        api=api,
        caller=caller,
        raw=raw,
        calls_per_block=calls,
        block_wall_s=tuple(w for w, _ in timed),
        block_cpu_s=tuple(c for _, c in timed),
    )


def measure_sync(
    target: str, model: str, inputs: dict[str, np.ndarray], request: predict_pb2.PredictRequest,
    blocks: int, calls: int, warmup: int,
) -> list[CallCost]:  # fmt: skip
    # The raw channel gets the client's own options, so only the call differs.
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES, None)
    with InferClient(target) as client, grpc.insecure_channel(target, options=options) as channel:
        stub = predict_pb2_grpc.PredictStub(channel)  # type: ignore[no-untyped-call]
        kinds = {
            True: lambda: client.infer(model, inputs),
            False: lambda: stub.Predict(request),
        }
        timed: dict[bool, list[Timed]] = {True: [], False: []}
        for call in kinds.values():
            _sync_block(call, warmup)
        for order in _interleave(blocks):
            for kind in order:
                timed[kind].append(_sync_block(kinds[kind], calls))
    return [
        _cost("sync", "InferClient.infer", False, calls, timed[True]),
        _cost("sync", "PredictStub.Predict (request built once)", True, calls, timed[False]),
    ]


async def measure_async(
    target: str, model: str, inputs: dict[str, np.ndarray], request: predict_pb2.PredictRequest,
    blocks: int, calls: int, warmup: int,
) -> list[CallCost]:  # fmt: skip
    options = channel_options(DEFAULT_MAX_MESSAGE_BYTES, None)
    async with (
        AsyncInferClient(target) as client,
        grpc.aio.insecure_channel(target, options=options) as channel,
    ):
        stub = predict_pb2_grpc.PredictStub(channel)  # type: ignore[no-untyped-call]
        kinds = {
            True: lambda: client.infer(model, inputs),
            False: lambda: stub.Predict(request),
        }
        timed: dict[bool, list[Timed]] = {True: [], False: []}
        for call in kinds.values():
            await _async_block(call, warmup)
        for order in _interleave(blocks):
            for kind in order:
                timed[kind].append(await _async_block(kinds[kind], calls))
    return [
        _cost("async", "AsyncInferClient.infer", False, calls, timed[True]),
        _cost("async", "aio PredictStub.Predict (request built once)", True, calls, timed[False]),
    ]


def run_benchmark(
    target: str, model: str, blocks: int = 3, calls: int = 2000, warmup: int = 200
) -> ClientBenchmark:
    """Both APIs against the inferd at `target`, one row per request."""
    spec = TargetSpec("native", target, model)
    driver = NativeDriver(spec)
    try:
        signature = driver.signature()
    finally:
        driver.close()
    payload = build_payloads(signature, 1, seed=0, distinct=1)[0]
    request = predict_pb2.PredictRequest.FromString(encode_predict_request(spec, payload))
    inputs = dict(payload)
    costs = measure_sync(target, model, inputs, request, blocks, calls, warmup)
    costs += asyncio.run(measure_async(target, model, inputs, request, blocks, calls, warmup))
    return ClientBenchmark(
        model=model,
        input_shape=tuple(next(iter(inputs.values())).shape),
        blocks=blocks,
        calls_per_block=calls,
        warmup=warmup,
        costs=tuple(costs),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m inferd.loadtest.bench.client",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--model", default="tiny", help="a model of the bench repository")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="calls per block and kind")
    parser.add_argument("--warmup", type=int, default=200, help="calls per kind, not measured")
    parser.add_argument(
        "--target", help="an inferd already running (loopback); default: start one here"
    )
    parser.add_argument("--document", type=Path, default=PROJECT_ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-document", action="store_true", help="print only")
    args = parser.parse_args(argv)

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = PROJECT_ROOT / ".bench" / "client"
    server = None
    target = args.target
    if target is None:
        repository = build_bench_repository(workdir / "repository")
        server = start_inferd(repository, workdir / "inferd.log", metrics=False)
        target = server.target
    else:
        require_loopback(target)
    try:
        bench = run_benchmark(target, args.model, args.blocks, args.calls, args.warmup)
    finally:
        if server is not None:
            server.stop()
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python -m inferd.loadtest.bench.client", *given])
    section = client_cost_section(bench, command)
    print(section)
    results = PROJECT_ROOT / "loadtest" / "results"
    results.mkdir(parents=True, exist_ok=True)
    report = results / f"client-{stamp}.json"
    record = {
        **asdict(bench),
        "per_call": [
            {"api": c.api, "caller": c.caller, "mean_us": c.mean_us, "cpu_us": c.cpu_us}
            for c in bench.costs
        ],
    }
    report.write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_document:
        write_section(args.document.resolve(), CLIENT_HEADING, section)
        print(f"client: wrote the '{CLIENT_HEADING[3:]}' section of {args.document} ({report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
