"""Admission control: what the server lets in before it does any work on a request.

A request that would push the server past a bound is answered RESOURCE_EXHAUSTED at once,
before its message is parsed: under overload or a flood of large messages the server spends
a few microseconds per refusal instead of the memory and CPU of a request it cannot serve in
time. The batcher's own bounds (a bounded queue, shedding what cannot meet its deadline) come
after this one (`batching/batcher.py`).
"""

from __future__ import annotations

from inferd.core.errors import QueueFull


class ByteBudget:
    """Bytes of request messages held by requests in flight, bounded by `limit`.

    A request is charged its message's size on arrival and refunded when it is answered (for
    a stream's request, when its answer has been sent). Parsed, a message of raw tensors holds
    about as much again (its contents are read into arrays without another copy); typed
    contents (the Open Inference Protocol's `contents` fields) up to ~20x while parsed (20M
    packed INT64 zeros: 20 MB on the wire, ~430 MB parsed), so the budget bounds how many such
    messages are held at once, and `max_message_bytes` how large one is. One request larger
    than the whole budget is still let in when nothing else is held, so that a legal message
    is never refused on an idle server.
    """

    __slots__ = ("in_use", "limit", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the byte budget must be at least 1")
        self.limit = limit
        self.in_use = 0
        self.refused = 0

    def acquire(self, size: int, own: int = 0) -> None:
        """Charge `size` bytes; QueueFull (RESOURCE_EXHAUSTED) when that would exceed the
        budget. `own`: bytes this request already holds (its message), which do not make the
        server busy: with nothing else held, it is let in whatever its size."""
        if self.in_use + size > self.limit and self.in_use > own:
            self.refused += 1
            raise QueueFull(
                f"the server holds {self.in_use} bytes of requests in flight; a {size}-byte "
                f"request would exceed its budget of {self.limit} bytes "
                "(max_request_bytes_in_flight): retry later"
            )
        self.in_use += size

    def release(self, size: int) -> None:
        self.in_use -= size


class RequestMemory:
    """One model version's admission by memory: each request is charged an estimate of what it
    holds while queued and executing (`factor` x its input bytes) against the version's own
    budget (`limit`, 0: none) and, beyond the message bytes already charged on arrival, the
    server's. Only a version configured with a factor above 1 or a budget has one: the others
    pay nothing per request."""

    __slots__ = ("_budget", "factor", "model")

    def __init__(self, model: str, factor: float, limit: int) -> None:
        self.model = model
        self.factor = factor
        self._budget = ByteBudget(limit) if limit else None

    @classmethod
    def configured(cls, model: str, factor: float, limit: int) -> RequestMemory | None:
        return cls(model, factor, limit) if factor > 1.0 or limit else None

    def acquire(self, input_bytes: int, server: ByteBudget | None) -> tuple[int, int]:
        """Charge a request of `input_bytes`; (model charge, server charge), to `release`.
        Raises QueueFull (RESOURCE_EXHAUSTED) when either budget would be exceeded."""
        estimate = int(self.factor * input_bytes)
        extra = estimate - input_bytes if server is not None else 0
        model = 0
        if self._budget is not None:
            try:
                self._budget.acquire(estimate)
            except QueueFull:
                raise QueueFull(
                    f"model '{self.model}' holds ~{self._budget.in_use} bytes of requests in "
                    f"flight; this one's ~{estimate} (request_memory_factor {self.factor:g} x "
                    f"{input_bytes} input bytes) would exceed its max_request_bytes_in_flight "
                    f"of {self._budget.limit}: retry later"
                ) from None
            model = estimate
        if extra > 0 and server is not None:
            try:
                server.acquire(extra, own=input_bytes)
            except QueueFull:
                self.release((model, 0), server)
                raise
        return model, max(extra, 0)

    def release(self, charged: tuple[int, int], server: ByteBudget | None) -> None:
        model, extra = charged
        if model and self._budget is not None:
            self._budget.release(model)
        if extra and server is not None:
            server.release(extra)
