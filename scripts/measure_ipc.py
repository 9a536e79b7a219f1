"""How a frontend process could hand a request to an engine process, measured: the transport
for `inferd serve --workers N` (one engine per model, frontends in several processes; see the
workers issue and docs/benchmarks.md, "Between processes").

    python scripts/measure_ipc.py [--seconds 3] [--sizes 256,393216,4194304]

For each transport an engine process is started (spawn) that answers every request: it reads
the request's tensor, writes an answer of the same size, and replies. The frontend, an asyncio
loop like the server's, sends requests at concurrency 1 (round-trip latency) and 64 (pipelined
throughput) and reports per request: wall time, and CPU time of each side (process CPU time
over the run ÷ requests), which is what a frontend and the engine would pay per request.

Transports:
- `socket+shm`: a Unix stream socket carries a 24-byte control message each way (id, offset,
  size); the tensor bytes go through a shared-memory slab both processes map
  (multiprocessing.shared_memory), written once by the sender and read in place (numpy view)
  by the receiver;
- `socket+bytes`: the same socket carries the tensor bytes too (a copy into the kernel and out
  again per direction): what a plain pipe costs;
- `pipe+pickle`: multiprocessing.Pipe with pickled (id, numpy array) messages: what naive
  multiprocessing does, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<QQQ")  # request id, offset in the slab, size
PIPE_BUFFER = 65536  # a pipe's kernel buffer on Linux
SLOTS = 64  # requests in flight at once; each has one slot for its input and one for its answer


def _engine_socket(path: str, shm_name: str | None, answers_at: int, ready: mp.Event) -> None:
    """The engine: answers each request on the socket (tensor via shm or inline); a request
    in the slab at `offset` is answered at `answers_at + offset`. Reports its CPU time from
    the first request on (not its start-up)."""
    shm = shared_memory.SharedMemory(name=shm_name) if shm_name else None
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    ready.set()
    conn, _ = server.accept()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    reader = conn.makefile("rb", buffering=1 << 20)
    started: float | None = None
    try:
        while True:
            header = reader.read(HEADER.size)
            if len(header) < HEADER.size:
                break
            if started is None:
                started = time.process_time()
            ident, offset, size = HEADER.unpack(header)
            if shm is not None:
                request = np.frombuffer(shm.buf, np.uint8, size, offset)
                out = answers_at + offset
                shm.buf[out : out + size] = request  # "compute": the answer is the input
                conn.sendall(HEADER.pack(ident, out, size))
                del request
            else:
                payload = reader.read(size)
                conn.sendall(HEADER.pack(ident, 0, size) + payload)
        conn.sendall(struct.pack("<d", time.process_time() - (started or 0.0)))
    finally:
        conn.close()
        if shm is not None:
            shm.close()


def _engine_pipe(conn: mp.connection.Connection) -> None:
    started: float | None = None
    while True:
        message = conn.recv()
        if started is None:
            started = time.process_time()
        if message is None:
            conn.send(time.process_time() - started)
            return
        ident, array = message
        conn.send((ident, array.copy()))


async def _drive(
    send: Callable[[int], Awaitable[None]], concurrency: int, seconds: float
) -> tuple[int, float, float]:
    """Requests at `concurrency` for `seconds`: (count, wall seconds, frontend CPU seconds)."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop(worker: int) -> None:
        nonlocal done
        ident = worker
        while time.perf_counter() < stop_at:
            await send(ident % SLOTS)
            ident += concurrency
            done += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(loop(w) for w in range(concurrency)))
    return done, time.perf_counter() - wall, time.process_time() - cpu


async def _socket_transport(
    size: int, use_shm: bool, concurrency: int, seconds: float
) -> tuple[int, float, float, float]:
    ctx = mp.get_context("spawn")
    path = str(Path(tempfile.mkdtemp()) / "engine.sock")
    slot_bytes = max(size, 1)
    shm = shared_memory.SharedMemory(create=True, size=2 * SLOTS * slot_bytes) if use_shm else None
    ready = ctx.Event()
    engine = ctx.Process(
        target=_engine_socket, args=(path, shm.name if shm else None, SLOTS * slot_bytes, ready)
    )
    engine.start()
    ready.wait(30)
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    waiting: dict[int, asyncio.Future[np.ndarray]] = {}

    async def receive() -> None:
        while True:
            header = await reader.readexactly(HEADER.size)
            ident, offset, length = HEADER.unpack(header)
            if shm is not None:
                answer = np.frombuffer(shm.buf, np.uint8, length, offset).copy()
            else:
                answer = np.frombuffer(await reader.readexactly(length), np.uint8)
            waiting.pop(ident).set_result(answer)

    receiver = asyncio.create_task(receive())
    sequence = 0

    async def send(slot: int) -> None:
        nonlocal sequence
        sequence += 1
        ident = sequence
        future = asyncio.get_running_loop().create_future()
        waiting[ident] = future
        if shm is not None:
            offset = slot * slot_bytes
            shm.buf[offset : offset + size] = payload.data
            writer.write(HEADER.pack(ident, offset, size))
        else:
            writer.write(HEADER.pack(ident, 0, size) + payload.tobytes())
        answer = await future
        assert answer.size == size

    try:
        count, wall, cpu = await _drive(send, concurrency, seconds)
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        writer.write_eof()
    engine_cpu = struct.unpack("<d", await reader.readexactly(8))[0]
    writer.close()
    engine.join(10)
    if shm is not None:
        shm.close()
        shm.unlink()
    os.unlink(path)
    return count, wall, cpu, engine_cpu


async def _pipe_transport(
    size: int, concurrency: int, seconds: float
) -> tuple[int, float, float, float]:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    engine = ctx.Process(target=_engine_pipe, args=(theirs,))
    engine.start()
    loop = asyncio.get_running_loop()
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    waiting: dict[int, asyncio.Future[np.ndarray]] = {}

    def readable() -> None:
        while ours.poll():
            ident, answer = ours.recv()
            waiting.pop(ident).set_result(answer)

    loop.add_reader(ours.fileno(), readable)
    sequence = 0

    async def send(slot: int) -> None:
        nonlocal sequence
        sequence += 1
        future = loop.create_future()
        waiting[sequence] = future
        ours.send((sequence, payload))
        assert (await future).size == size

    try:
        count, wall, cpu = await _drive(send, concurrency, seconds)
    finally:
        loop.remove_reader(ours.fileno())
    ours.send(None)
    engine_cpu = ours.recv()
    engine.join(10)
    return count, wall, cpu, engine_cpu


TRANSPORTS = {
    "socket+shm": lambda size, c, s: _socket_transport(size, True, c, s),
    "socket+bytes": lambda size, c, s: _socket_transport(size, False, c, s),
    "pipe+pickle": _pipe_transport,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--sizes", default="256,393216,4194304", help="tensor bytes each way")
    args = parser.parse_args(argv)
    print(
        "| transport | tensor bytes | c | requests/s | wall µs/request | frontend CPU µs "
        "| engine CPU µs |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for name, transport in TRANSPORTS.items():
            for concurrency in (1, 64):
                if name == "pipe+pickle" and concurrency > 1 and size > PIPE_BUFFER:
                    # Its sends block the loop: with both directions' buffers full, the two
                    # processes wait on each other for good.
                    print(f"| {name} | {size:,} | {concurrency} | deadlocks | | | |")
                    continue
                count, wall, cpu, engine_cpu = asyncio.run(
                    transport(size, concurrency, args.seconds)
                )
                print(
                    f"| {name} | {size:,} | {concurrency} | {count / wall:,.0f} | "
                    f"{wall / count * 1e6:,.1f} | {cpu / count * 1e6:,.1f} | "
                    f"{engine_cpu / count * 1e6:,.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
