"""The server's own account of a load level: where a request's time went and how big the
executed batches were, from counter deltas taken at the level's window boundaries.

inferd reports them through ModelStatus.GetModelStatus (VersionStatistics); Triton-compatible
servers through the Open Inference Protocol's ModelStatistics. Both count per successful
request the time it queued and the execution time of the batch it rode in, so the mean queue
and compute times below are per request, and mean batch size is rows executed ÷ batches run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters of one model (summed over the versions asked for)."""

    request_success: int = 0
    inference_count: int = 0
    execution_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    # Executed batch size (rows) -> batches run at that size.
    batch_sizes: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def total(cls, parts: Iterable[ServerCounters]) -> ServerCounters:
        sizes: dict[int, int] = {}
        success = inference = execution = queue = compute = 0
        for part in parts:
            success += part.request_success
            inference += part.inference_count
            execution += part.execution_count
            queue += part.queue_ns
            compute += part.compute_ns
            for size, count in part.batch_sizes.items():
                sizes[size] = sizes.get(size, 0) + count
        return cls(success, inference, execution, queue, compute, sizes)

    def since(self, before: ServerCounters) -> ServerSplit:
        requests = self.request_success - before.request_success
        rows = self.inference_count - before.inference_count
        executions = self.execution_count - before.execution_count
        queue_ns = self.queue_ns - before.queue_ns
        compute_ns = self.compute_ns - before.compute_ns
        sizes = {
            size: count - before.batch_sizes.get(size, 0)
            for size, count in self.batch_sizes.items()
            if count - before.batch_sizes.get(size, 0) > 0
        }
        return ServerSplit(
            requests=requests,
            rows=rows,
            executions=executions,
            mean_queue_ms=queue_ns / requests / 1e6 if requests else float("nan"),
            mean_compute_ms=compute_ns / requests / 1e6 if requests else float("nan"),
            mean_batch_size=rows / executions if executions else float("nan"),
            batch_sizes=dict(sorted(sizes.items())),
        )


@dataclass(frozen=True)
class ServerSplit:
    """What the server counted between two snapshots."""

    requests: int
    rows: int
    executions: int
    mean_queue_ms: float
    mean_compute_ms: float
    mean_batch_size: float
    batch_sizes: dict[int, int]

    @classmethod
    def combine(cls, splits: Iterable[ServerSplit]) -> ServerSplit:
        """Several measurements of the same level (rounds) as one."""
        parts = list(splits)
        requests = sum(s.requests for s in parts)
        rows = sum(s.rows for s in parts)
        executions = sum(s.executions for s in parts)
        sizes: dict[int, int] = {}
        for part in parts:
            for size, count in part.batch_sizes.items():
                sizes[size] = sizes.get(size, 0) + count

        def weighted(value: str) -> float:
            if not requests:
                return float("nan")
            return (
                float(sum(getattr(s, value) * s.requests for s in parts if s.requests)) / requests
            )

        return cls(
            requests=requests,
            rows=rows,
            executions=executions,
            mean_queue_ms=weighted("mean_queue_ms"),
            mean_compute_ms=weighted("mean_compute_ms"),
            mean_batch_size=rows / executions if executions else float("nan"),
            batch_sizes=dict(sorted(sizes.items())),
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "executions": self.executions,
            "mean_queue_ms": self.mean_queue_ms,
            "mean_compute_ms": self.mean_compute_ms,
            "mean_batch_size": self.mean_batch_size,
            "batch_sizes": {str(k): v for k, v in self.batch_sizes.items()},
        }
