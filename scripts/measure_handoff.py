"""What handing a batch to a worker thread and back costs on this machine: the round trip of
`loop.run_in_executor` with a function that does nothing, wall and process CPU time per call.
It sets the batches that `OnnxRuntimeSession` runs inline (INLINE_BELOW in
server/inferd/core/runtime/session.py)."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor


def nothing() -> int:
    return 1


async def main(n: int = 20_000) -> None:
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(1)
    for _ in range(1000):
        await loop.run_in_executor(pool, nothing)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await loop.run_in_executor(pool, nothing)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"run_in_executor round trip: wall {wall / n * 1e6:.1f} us, CPU {cpu / n * 1e6:.1f} us")


if __name__ == "__main__":
    asyncio.run(main())
