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
    a stream's request, when its answer has been sent). Parsed, a message holds about as much
    again (its tensors' contents are read into arrays without another copy), so the memory
    requests hold is a small multiple of `in_use`. One request larger than the whole budget is
    still let in when nothing else is held, so that a legal message is never refused on an idle
    server; the gRPC message size limit bounds it.
    """

    __slots__ = ("in_use", "limit", "refused")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the byte budget must be at least 1")
        self.limit = limit
        self.in_use = 0
        self.refused = 0

    def acquire(self, size: int) -> None:
        """Charge `size` bytes; QueueFull (RESOURCE_EXHAUSTED) when that would exceed the
        budget."""
        if self.in_use + size > self.limit and self.in_use > 0:
            self.refused += 1
            raise QueueFull(
                f"the server holds {self.in_use} bytes of requests in flight; a {size}-byte "
                f"request would exceed its budget of {self.limit} bytes "
                "(max_request_bytes_in_flight): retry later"
            )
        self.in_use += size

    def release(self, size: int) -> None:
        self.in_use -= size
