"""Answering a request stream concurrently; shared by the native and OIP frontends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from inferd.api.wire import Incoming

Request = TypeVar("Request")
Response = TypeVar("Response")


async def answer_concurrently(
    requests: AsyncIterator[Incoming[Request]],
    answer: Callable[[Incoming[Request]], Awaitable[Response]],
    window: int,
) -> AsyncIterator[Response]:
    """Answers of a request stream, each as soon as it is ready: requests run concurrently, at
    most `window` at once, counted until their answer has been sent (the stream reads no
    further meanwhile: back-pressure instead of unbounded memory, also against a client that
    sends without reading). `answer` must not raise."""
    answers: asyncio.Queue[tuple[Response, Incoming[Request]] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Task[None]] = set()

    async def run(request: Incoming[Request]) -> None:
        try:
            response = await answer(request)
        except BaseException:
            request.release()
            slots.release()
            raise
        answers.put_nowait((response, request))

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
            response, request = item
            try:
                yield response  # resumes once gRPC has sent it
            finally:
                request.release()
                slots.release()
        await reader
    finally:
        reader.cancel()
        for task in running:
            task.cancel()
        while not answers.empty():
            if (left := answers.get_nowait()) is not None:
                left[1].release()
