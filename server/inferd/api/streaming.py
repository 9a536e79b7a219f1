"""Answering a request stream concurrently; shared by the native and OIP frontends."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from inferd.api.wire import Incoming

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")


async def answer_concurrently(
    requests: AsyncIterator[Incoming[Request]],
    answer: Callable[[Incoming[Request]], Awaitable[Response]],
    window: int,
    failed: Callable[[Incoming[Request], Exception], Response],
) -> AsyncIterator[Response]:
    """Answers of a request stream, each as soon as it is ready: requests run concurrently, at
    most `window` at once, counted until their answer has been sent (the stream reads no
    further meanwhile: back-pressure instead of unbounded memory, also against a client that
    sends without reading). `answer` answers the errors it knows with their status; anything
    else it raises (a bug) is logged and answered with `failed`, so that every request still
    gets exactly one answer."""
    answers: asyncio.Queue[tuple[Response, Incoming[Request]] | None] = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    running: set[asyncio.Task[None]] = set()

    async def run(request: Incoming[Request]) -> None:
        try:
            response = await answer(request)
        except Exception as exc:
            log.exception("a stream's request failed unexpectedly")
            response = failed(request, exc)
        answers.put_nowait((response, request))

    def ran(request: Incoming[Request], task: asyncio.Task[None]) -> None:
        running.discard(task)
        # Cancelled (perhaps before it ever started: the stream ended) or failed: nothing will
        # be sent for it, so its slot and bytes are free now.
        if task.cancelled() or task.exception() is not None:
            request.release()
            slots.release()

    async def read() -> None:
        try:
            async for request in requests:
                try:
                    await slots.acquire()
                except BaseException:
                    request.release()  # the stream ended while it waited for a slot
                    raise
                task = asyncio.get_running_loop().create_task(run(request))
                running.add(task)
                task.add_done_callback(functools.partial(ran, request))
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
