"""What a request costs, as the benchmarks report it: on the server (scenario 8, the framework
ceiling: throughput, latency and server CPU per request, and inferd's ratios to the others) and
in the client (`python -m inferd.loadtest.bench.client`: time and CPU per call)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inferd.loadtest.latency import LatencySummary
from inferd.loadtest.runner import LevelResult

CEILING, INFERD, TRITON = "ceiling", "inferd", "triton"


@dataclass(frozen=True)
class ServerCost:
    """One server through one protocol at one load level."""

    server: str
    label: str
    protocol: str
    level: str
    stable: bool
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    # Server process CPU (user + system, descendants included) per answered request.
    cpu_us_per_request: float | None

    @classmethod
    def of(cls, server: str, label: str, protocol: str, result: LevelResult) -> ServerCost:
        latency = LatencySummary.of(result.measured.latencies)
        cpu = result.server_cpu_ms_per_request
        return cls(
            server=server,
            label=label,
            protocol=protocol,
            level=result.level.label,
            stable=result.stable,
            requests_per_s=result.requests_per_s,
            p50_ms=latency.p50_ms,
            p99_ms=latency.p99_ms,
            errors=sum(result.measured.errors.values()),
            cpu_us_per_request=cpu * 1e3 if cpu is not None else None,
        )


@dataclass(frozen=True)
class CostRatio:
    """inferd ÷ another server, same protocol and level (None where that server did not run)."""

    protocol: str
    level: str
    other: str
    requests_per_s: float | None
    p50: float | None
    p99: float | None
    cpu_per_request: float | None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def cost_ratios(costs: Sequence[ServerCost], other: str) -> list[CostRatio]:
    """inferd ÷ `other` for every (protocol, level) both were measured at."""
    by_key = {(c.server, c.protocol, c.level): c for c in costs}
    out = []
    for mine in costs:
        if mine.server != INFERD:
            continue
        theirs = by_key.get((other, mine.protocol, mine.level))
        if theirs is None:
            continue
        out.append(
            CostRatio(
                protocol=mine.protocol,
                level=mine.level,
                other=theirs.label,
                requests_per_s=_ratio(mine.requests_per_s, theirs.requests_per_s),
                p50=_ratio(mine.p50_ms, theirs.p50_ms),
                p99=_ratio(mine.p99_ms, theirs.p99_ms),
                cpu_per_request=_ratio(mine.cpu_us_per_request, theirs.cpu_us_per_request),
            )
        )
    return out


@dataclass(frozen=True)
class CallCost:
    """Calls of one kind, one after another, in every block."""

    api: str
    # What was called, e.g. "InferClient.infer".
    caller: str
    # The generated stub with a request built once (the baseline), or the client library.
    raw: bool
    calls_per_block: int
    block_wall_s: tuple[float, ...]
    # time.process_time(): this process's CPU, all its threads.
    block_cpu_s: tuple[float, ...]

    @property
    def calls(self) -> int:
        return self.calls_per_block * len(self.block_wall_s)

    @property
    def mean_us(self) -> float:
        return sum(self.block_wall_s) / self.calls * 1e6

    @property
    def cpu_us(self) -> float:
        return sum(self.block_cpu_s) / self.calls * 1e6

    @property
    def block_us(self) -> tuple[float, ...]:
        return tuple(w / self.calls_per_block * 1e6 for w in self.block_wall_s)


@dataclass(frozen=True)
class ClientBenchmark:
    model: str
    input_shape: tuple[int, ...]
    blocks: int
    calls_per_block: int
    warmup: int
    costs: tuple[CallCost, ...]
    # The goal: a client call takes at most this many times a raw stub call.
    target_ratio: float = 1.2

    def pairs(self) -> list[tuple[CallCost, CallCost]]:
        """(client, raw) per API, in the order measured."""
        apis = dict.fromkeys(c.api for c in self.costs)
        return [
            (
                next(c for c in self.costs if c.api == api and not c.raw),
                next(c for c in self.costs if c.api == api and c.raw),
            )
            for api in apis
        ]
