"""How long a lone request really waits in the queue for a given max_queue_delay_us.

In-process server, one client sending sequentially (concurrency 1), mlp with no delay and
with the given delay; prints mean latency and the server's mean queue and compute time per
request (from ModelStatus). Justifies server/inferd/core/batching/timer.py:
    .venv/bin/python scripts/measure_queue_delay.py --delay-us 200
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from inferd.app import InferenceServer
from inferd.config import ServerConfig
from inferd.demo_models import build_mlp, write_model
from inferd_client import AsyncInferClient


async def measure(delay_us: int, requests: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        repo = Path(root)
        write_model(build_mlp(), repo, "mlp_no_delay")
        write_model(
            build_mlp(), repo, "mlp_delay", config_toml=f"max_queue_delay_us = {delay_us}\n"
        )
        config = ServerConfig.load(
            None, model_repository=repo, port=0, metrics_port=-1, log_level="WARNING"
        )
        server = InferenceServer(config)
        await server.start()
        try:
            async with AsyncInferClient(f"127.0.0.1:{server.port}") as client:
                x = {"input": np.random.default_rng(0).random((1, 64), np.float32)}
                for model in ("mlp_no_delay", "mlp_delay"):
                    for _ in range(50):
                        await client.infer(model, x)
                    before = (await client.status(model))[0].statistics
                    started = time.perf_counter()
                    for _ in range(requests):
                        await client.infer(model, x)
                    elapsed = time.perf_counter() - started
                    after = (await client.status(model))[0].statistics
                    queue = (after["queue_ns"] - before["queue_ns"]) / requests / 1e3
                    compute = (after["compute_ns"] - before["compute_ns"]) / requests / 1e3
                    print(
                        f"{model:<13} latency {elapsed / requests * 1e3:.2f} ms  "
                        f"queue {queue:.0f} us  compute {compute:.0f} us"
                    )
        finally:
            await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay-us", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(measure(args.delay_us, args.requests))


if __name__ == "__main__":
    main()
