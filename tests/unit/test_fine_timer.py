"""wait_until returns when its event is set or its deadline passes, on both paths (a sleeping
thread below FINE_BELOW, the loop's own timer above), on a real loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inferd.core.batching.timer import FINE_BELOW, wait_until


@pytest.mark.parametrize("wait", [FINE_BELOW / 8, FINE_BELOW * 4])
async def test_returns_once_the_deadline_has_passed(wait: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    await wait_until(asyncio.Event(), deadline)
    # Not early (the loop's clock may round by its resolution).
    assert loop.time() >= deadline - 1e-6


@pytest.mark.parametrize("wait", [FINE_BELOW / 2, 10.0])
async def test_returns_when_the_event_is_set_first(wait: float) -> None:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    loop.call_soon(event.set)
    deadline = loop.time() + wait
    async with asyncio.timeout(5):
        await wait_until(event, deadline)
    assert event.is_set()


async def test_a_past_deadline_returns_at_once() -> None:
    loop = asyncio.get_running_loop()
    sleepers_before = _sleeping_threads()
    async with asyncio.timeout(1):
        await wait_until(asyncio.Event(), loop.time() - 1)
    assert _sleeping_threads() == sleepers_before, "no sleeper started for a past deadline"


async def test_many_short_waits_in_a_row_do_not_queue_behind_sleepers() -> None:
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    async with asyncio.timeout(5):
        for _ in range(20):
            event.clear()
            loop.call_soon(event.set)
            await wait_until(event, loop.time() + FINE_BELOW / 2)
            assert event.is_set()
        deadline = loop.time() + FINE_BELOW / 4
        await wait_until(asyncio.Event(), deadline)
    # The last wait still kept its own deadline, whatever the earlier sleepers were doing.
    assert loop.time() >= deadline - 1e-6


def _sleeping_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("inferd-timer"))
