"""Open-loop load: when each request is meant to be sent, and a scheduler that sends it then.

Latency in an open loop counts from the *intended* send time, not from when the request
actually left. A server that stalls for a second therefore shows a second of extra latency on
every request that should have gone out during the stall, instead of the one request that was
stuck (coordinated omission). The scheduler never skips an arrival: when it falls behind (the
generator's own loop was late, or `max_in_flight` requests are outstanding), it sends late and
the lateness is part of the latency. How late it sent is reported apart (`send lag`) so that a
generator that cannot keep up is visible as such.

The scheduler reads time from the running event loop only (`loop.time()`), so tests drive it
with a fake clock (looptime) and check that every request went out at its intended time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import numpy as np

Arrival = Literal["constant", "poisson"]

# The longest the scheduler sleeps in one go, so a stop request is seen promptly even at a
# low rate.
_MAX_NAP_S = 0.05


def constant_arrivals(rate: float, phase: float = 0.0) -> Iterator[float]:
    """Offsets (s from the start) of evenly spaced arrivals: phase, phase + 1/rate, ...

    With W generators each at rate r/W, phases i/r (i = 0..W-1) interleave them into one
    evenly spaced stream at rate r.
    """
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    gap = 1.0 / rate
    return (phase + k * gap for k in itertools.count())


def poisson_arrivals(rate: float, seed: int | None = None) -> Iterator[float]:
    """Offsets of a Poisson process: exponential gaps with mean 1/rate.

    Independent Poisson streams at rates r/W add up to one Poisson stream at rate r, so every
    generator draws its own with its own seed.
    """
    if rate <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate}")
    rng = np.random.default_rng(seed)

    def offsets() -> Iterator[float]:
        total = 0.0
        while True:
            for gap in rng.exponential(1.0 / rate, 4096):
                total += float(gap)
                yield total

    return offsets()


def arrivals(
    kind: Arrival, rate: float, *, phase: float = 0.0, seed: int | None = None
) -> Iterator[float]:
    """The arrival offsets for `kind` at `rate` requests/s."""
    if kind == "constant":
        return constant_arrivals(rate, phase)
    if kind == "poisson":
        return poisson_arrivals(rate, seed)
    raise ValueError(f"arrival must be 'constant' or 'poisson', got {kind!r}")


SendAt = Callable[[float], Awaitable[None]]


class OpenLoopScheduler:
    """Calls `send(intended_time)` at each intended time until `stop` is set.

    `send` is given the intended time (event-loop clock) and measures latency from it. At most
    `max_in_flight` sends are outstanding; beyond that the scheduler waits for one to finish
    (the wait is counted in the latency of the requests it delays, never dropped).
    """

    def __init__(self, send: SendAt, offsets: Iterator[float], max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._send = send
        self._offsets = offsets
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self.sent = 0

    async def run(self, start: float, stop: asyncio.Event) -> None:
        """Send from `start` (loop time) until `stop` is set; returns without waiting for the
        requests still in flight (see `drain`)."""
        loop = asyncio.get_running_loop()
        for offset in self._offsets:
            intended = start + offset
            while not stop.is_set():
                delay = intended - loop.time()
                if delay <= 0:
                    break
                await asyncio.sleep(min(delay, _MAX_NAP_S))
            if stop.is_set() or not await self._acquire_slot(stop):
                return
            task = asyncio.create_task(self._send_one(intended))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            self.sent += 1

    async def _acquire_slot(self, stop: asyncio.Event) -> bool:
        """Wait for a free in-flight slot; False (holding none) if `stop` is set first."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        acquire = asyncio.create_task(self._slots.acquire())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
        try:
            await acquire
        except asyncio.CancelledError:
            return False
        if stop.is_set():
            self._slots.release()
            return False
        return True

    async def _send_one(self, intended: float) -> None:
        try:
            await self._send(intended)
        finally:
            self._slots.release()

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for outstanding requests, cancel the rest; returns how many
        were cancelled."""
        pending = set(self._in_flight)
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=grace_s)
        for task in still:
            task.cancel()
        if still:
            await asyncio.gather(*still, return_exceptions=True)
        return len(still)
