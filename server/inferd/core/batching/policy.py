"""When a batch closes: the batcher's policy and what each knob costs and buys."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchingPolicy:
    max_batch_size: int
    """Most rows in one executed batch; 0 for a model without a batch dim (each request runs
    alone, as sent). Larger batches buy throughput per execution and cost the latency of the
    longer run, and of waiting for rows to arrive."""

    max_queue_delay: float = 0.0
    """Seconds the oldest waiting request may wait for a batch to fill. 0 dispatches whatever is
    queued as soon as an execution slot is free, so batches still form under load (while every
    slot is busy) and an idle server adds no latency. Raising it fills batches at low load at the
    cost of up to this much added latency per request."""

    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes dispatched as soon as they can be formed, without waiting for the delay (e.g.
    sizes the runtime is fastest at). Empty: only a full batch or the delay dispatches."""

    max_queue_size: int = 1024
    """Requests that may wait (not counting those executing). A full queue answers
    RESOURCE_EXHAUSTED at once: a bounded wait instead of unbounded latency under overload."""

    instances: int = 1
    """Batches in flight at once. More overlap the Python work of one batch with the execution
    of another (and on a GPU, kernels of several), at the cost of memory per slot and smaller
    batches at moderate load."""

    default_priority: int = 1
    """The level of a request that names none (priority 0). Smaller levels run first."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        if self.max_queue_delay < 0:
            raise ValueError("max_queue_delay must be >= 0")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= max(self.max_batch_size, 1):
                raise ValueError(
                    f"preferred batch size {size} is outside 1..max_batch_size "
                    f"({self.max_batch_size})"
                )

    @property
    def batch_limit(self) -> int:
        """Rows one execution may hold: a model without a batch dim runs requests one by one."""
        return self.max_batch_size if self.max_batch_size > 0 else 1
