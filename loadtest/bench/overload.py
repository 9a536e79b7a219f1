"""The overload probe: what a server does when offered more than it can serve.

For each model: the unloaded latency; the closed-loop peak (OK/s); then an open loop at
`factor` x that peak for `duration` seconds, each request with a `deadline`; then the unloaded
latency again. Reported per gRPC code: count and latency (p50, p99); the server's RSS before
and at its highest; what the server executed that nobody received (requests executed, from its
own counters, minus OK answers); the rejection reasons it counted.

    python -m inferd.loadtest.bench.overload --models mlp,cnn --out docs/benchmarks/overload

A server of another checkout (the figures before a change): `--pythonpath OLD/server:OLD/client`.
The load generator is one asyncio process sending pre-serialised requests through raw gRPC
calls (no client library), so that it costs as little as it can; on a small machine it shares
the cores with the server, and the offered rate it reached is reported beside the one asked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.server_process import InferdProcess, start_inferd
from inferd_wire.codec import to_wire
from inferd_wire.proto.inferd.v1 import predict_pb2, tensor_pb2

PREDICT = "/inferd.v1.Predict/Predict"

# model -> (input name, shape of one request, closed-loop concurrency for the peak)
MODELS = {
    "mlp": ("input", (1, 64), 16),
    "cnn": ("image", (8, 3, 64, 64), 4),
}


@dataclass
class CodeFigures:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class OverloadResult:
    model: str
    rows_per_request: int
    peak_ok_per_s: float
    offered_per_s: float
    reached_per_s: float
    duration_s: float
    deadline_s: float
    codes: dict[str, CodeFigures]
    ok_per_s: float
    executed_requests: float
    executed_not_ok: float
    rejections: dict[str, float]
    rss_before_mb: float
    rss_max_mb: float
    unloaded_p50_before_ms: float
    unloaded_p50_after_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok_over_peak(self) -> float:
        return self.ok_per_s / self.peak_ok_per_s if self.peak_ok_per_s else 0.0


def request_bytes(model: str) -> bytes:
    name, shape, _ = MODELS[model]
    array = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    datatype, dims, contents = to_wire(array)
    message = predict_pb2.PredictRequest(
        model=model,
        inputs=[tensor_pb2.Tensor(name=name, datatype=datatype, shape=dims, contents=contents)],
    )
    return message.SerializeToString()


def rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


def scrape(metrics_port: int) -> dict[str, float]:
    """Every sample of /metrics, summed over its labels except `reason` (kept in the key as
    `name:reason`)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reason = sample.labels.get("reason")
            out[f"{sample.name}:{reason}" if reason else sample.name] += sample.value
    return out


async def unloaded_p50(channel: grpc.aio.Channel, payload: bytes, count: int) -> float:
    call = channel.unary_unary(PREDICT)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await call(payload, timeout=10.0)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


async def closed_loop_peak(
    channel: grpc.aio.Channel, payload: bytes, concurrency: int, seconds: float
) -> float:
    call = channel.unary_unary(PREDICT)
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await call(payload, timeout=10.0)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def open_loop(
    channels: Sequence[grpc.aio.Channel],
    payload: bytes,
    rate: float,
    seconds: float,
    deadline: float,
    pid: int,
) -> tuple[dict[str, list[float]], float, float]:
    """Send at `rate`/s for `seconds` (each call with `deadline`); (latencies by code, the rate
    reached, the highest RSS seen)."""
    calls = [c.unary_unary(PREDICT) for c in channels]
    latencies: dict[str, list[float]] = defaultdict(list)
    tasks: set[asyncio.Task[None]] = set()
    highest = rss_mb(pid)

    async def one(index: int) -> None:
        started = time.perf_counter()
        try:
            await calls[index % len(calls)](payload, timeout=deadline)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        latencies[code].append(time.perf_counter() - started)

    loop = asyncio.get_running_loop()
    begin = time.perf_counter()
    sent = 0
    next_rss = begin
    while (now := time.perf_counter()) < begin + seconds:
        due = int((now - begin) * rate) + 1
        while sent < due:
            task = loop.create_task(one(sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if now >= next_rss:
            highest = max(highest, rss_mb(pid))
            next_rss = now + 0.2
        await asyncio.sleep(0.001)
    reached = sent / (time.perf_counter() - begin)
    while tasks:
        highest = max(highest, rss_mb(pid))
        await asyncio.wait(tasks, timeout=0.2)
    return latencies, reached, highest


def figures(latencies: list[float]) -> CodeFigures:
    values = np.array(latencies) * 1e3
    return CodeFigures(
        count=len(latencies),
        p50_ms=round(float(np.percentile(values, 50)), 2),
        p99_ms=round(float(np.percentile(values, 99)), 2),
        max_ms=round(float(values.max()), 2),
    )


async def probe(
    server: InferdProcess, model: str, factor: float, duration: float, deadline: float
) -> OverloadResult:
    payload = request_bytes(model)
    _, shape, concurrency = MODELS[model]
    options = [("grpc.max_send_message_length", 64 << 20)]
    channels = [grpc.aio.insecure_channel(server.target, options=options) for _ in range(4)]
    try:
        await unloaded_p50(channels[0], payload, 50)  # warm up
        before_p50 = await unloaded_p50(channels[0], payload, 200)
        peak = await closed_loop_peak(channels[0], payload, concurrency, 5.0)
        start = scrape(server.metrics_port)
        rss_before = rss_mb(server.process.pid)
        by_code, reached, rss_max = await open_loop(
            channels, payload, factor * peak, duration, deadline, server.process.pid
        )
        await asyncio.sleep(1.0)
        end = scrape(server.metrics_port)
        after_p50 = await unloaded_p50(channels[0], payload, 200)
    finally:
        for channel in channels:
            await channel.close()
    rows = shape[0]
    executed = (
        end.get("inferd_inference_count_total", 0) - start.get("inferd_inference_count_total", 0)
    ) / rows
    ok = len(by_code.get("OK", []))
    rejections = {
        key.partition(":")[2]: end[key] - start.get(key, 0.0)
        for key in end
        if key.startswith("inferd_rejections_total:") and end[key] - start.get(key, 0.0)
    }
    return OverloadResult(
        model=model,
        rows_per_request=rows,
        peak_ok_per_s=round(peak, 1),
        offered_per_s=round(factor * peak, 1),
        reached_per_s=round(reached, 1),
        duration_s=duration,
        deadline_s=deadline,
        codes={code: figures(values) for code, values in sorted(by_code.items())},
        ok_per_s=round(ok / duration, 1),
        executed_requests=round(executed, 1),
        executed_not_ok=round(executed - ok, 1),
        rejections=rejections,
        rss_before_mb=round(rss_before, 1),
        rss_max_mb=round(rss_max, 1),
        unloaded_p50_before_ms=round(before_p50, 3),
        unloaded_p50_after_ms=round(after_p50, 3),
    )


def table(results: Sequence[OverloadResult], label: str) -> str:
    lines = [
        f"| {label} | model | peak OK/s | offered (reached) /s | OK/s ÷ peak "
        "| codes (count, p99 ms) "
        "| executed, not OK | RSS before → max MB | unloaded p50 after ÷ before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        codes = "; ".join(f"{c} {f.count} ({f.p99_ms:g})" for c, f in r.codes.items())
        lines.append(
            f"| | {r.model} ({r.rows_per_request} rows) | {r.peak_ok_per_s:,.0f} | "
            f"{r.offered_per_s:,.0f} ({r.reached_per_s:,.0f}) | {r.ok_over_peak:.2f} | {codes} | "
            f"{r.executed_not_ok:,.0f} | {r.rss_before_mb:.0f} → {r.rss_max_mb:.0f} | "
            f"{r.unloaded_p50_after_ms / r.unloaded_p50_before_ms:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--factor", type=float, default=3.0, help="offered load ÷ peak")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of overload")
    parser.add_argument("--deadline", type=float, default=2.0, help="each request's, seconds")
    parser.add_argument("--pythonpath", default="", help="serve another checkout's inferd")
    parser.add_argument("--label", default="inferd")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args(argv)

    env = dict(item.split("=", 1) for item in args.env)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = build_bench_repository(Path(tmp) / "models")
        for model in args.models.split(","):
            server = start_inferd(repository, Path(tmp) / f"{model}.log", env=env)
            try:
                result = asyncio.run(
                    probe(server, model, args.factor, args.duration, args.deadline)
                )
            finally:
                server.stop()
            errors = server.log_text().count("Traceback")
            if errors:
                result.notes.append(f"{errors} tracebacks in the server log")
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
    print(table(results, args.label))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.label}.json").write_text(
            json.dumps([asdict(r) for r in results], indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
