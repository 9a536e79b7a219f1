"""Answering a request stream concurrently; shared by the native and OIP frontends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Request = TypeVar("Request")
Response = TypeVar("Response")


async def answer_concurrently(
    requests: AsyncIterator[Request],
    answer: Callable[[Request], Awaitable[Response]],
    window: int,
) -> AsyncIterator[Response]:
    """Answers of a request stream, each as soon as it is ready: requests run concurrently, at
    most `window` at once (the stream reads no further until one is answered: back-pressure
    instead of unbounded memory). `answer` must not raise."""
    answers: asyncio.Queue[Response | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Task[None]] = set()

    async def run(request: Request) -> None:
        try:
            answers.put_nowait(await answer(request))
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(run(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.gather(*running, return_exceptions=True)
        finally:
            answers.put_nowait(None)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (item := await answers.get()) is not None:
            yield item
        await reader
    finally:
        reader.cancel()
        for task in running:
            task.cancel()
