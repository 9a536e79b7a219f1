"""Dynamic batching under concurrency, read back from the server's own counters.

64 concurrent clients (one AsyncInferClient, so one channel, each) send 30 one-row cnn requests
each to a dedicated server (its counters then count exactly these requests). The server must
merge concurrent requests into batches larger than one row, execute every row exactly once,
and route every row's output back to the request that sent it.

The model is the demo cnn, whose batches run for milliseconds on an execution thread, so
requests arriving meanwhile wait and batch. (The demo mlp runs a row in tens of microseconds,
faster than handing a batch to a thread: a lone request on an idle slot runs inline at once,
which served 1.44x the requests of batching at 64 clients, so its batches stay small.)

The observed batch-size histogram is printed (`pytest -s`), shown in the end-of-run summary,
and included in the assertion messages.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from integration_support import (
    ServerFactory,
    add_summary_line,
    assert_outputs_match,
    cnn_input,
    model_file,
    reference_outputs,
)

from inferd_client import AsyncInferClient

CLIENTS = 64
REQUESTS_PER_CLIENT = 30
ROWS_PER_REQUEST = 1


def histogram_text(batch_sizes: dict[int, int]) -> str:
    total = sum(batch_sizes.values())
    lines = [f"{'rows/batch':>10} {'batches':>8} {'share':>6}"]
    for size in sorted(batch_sizes):
        count = batch_sizes[size]
        lines.append(f"{size:>10} {count:>8} {count / total:>6.1%}")
    return "\n".join(lines)


async def test_concurrent_requests_are_batched_and_each_row_executes_once(
    start_server: ServerFactory, demo_repository: Path, request: pytest.FixtureRequest
):
    server = start_server(demo_repository)
    path = model_file(demo_repository, "cnn")
    rng = np.random.default_rng(2024)
    # Every request carries distinct rows, so a row answered to the wrong request shows.
    inputs = [
        [cnn_input(rng, ROWS_PER_REQUEST) for _ in range(REQUESTS_PER_CLIENT)]
        for _ in range(CLIENTS)
    ]

    async def one_client(mine: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        async with AsyncInferClient(server.target) as client:
            return [await client.infer("cnn", x, timeout=60) for x in mine]

    served = await asyncio.wait_for(
        asyncio.gather(*(one_client(mine) for mine in inputs)), timeout=100
    )

    max_diff = 0.0
    for c, (sent, got) in enumerate(zip(inputs, served, strict=True)):
        batch = {"image": np.concatenate([x["image"] for x in sent])}
        expected = reference_outputs(path, batch)["logits"]
        for r, out in enumerate(got):
            want = expected[r * ROWS_PER_REQUEST : (r + 1) * ROWS_PER_REQUEST]
            assert_outputs_match(out, {"logits": want}, f"client {c} request {r}")
            max_diff = max(max_diff, float(np.abs(out["logits"] - want).max()))

    async with AsyncInferClient(server.target) as client:
        stats = (await client.status("cnn"))[0].statistics
    sizes: dict[int, int] = stats["batch_sizes"]
    requests = CLIENTS * REQUESTS_PER_CLIENT
    rows = requests * ROWS_PER_REQUEST
    table = histogram_text(sizes)
    mean = stats["inference_count"] / max(stats["execution_count"], 1)
    summary = (
        f"cnn batch sizes, {CLIENTS} concurrent clients x {REQUESTS_PER_CLIENT} requests of "
        f"{ROWS_PER_REQUEST} row (cnn: max_batch_size 32, max_queue_delay_us 1000, 1 instance): "
        f"{stats['execution_count']} executions for {rows} rows, mean {mean:.1f} rows/batch, "
        f"max |served - in-process ORT| = {max_diff:.2e}\n{table}"
    )
    print("\n" + summary)
    add_summary_line(request.config, summary)

    assert stats["inference_count"] == rows, summary
    assert sum(size * count for size, count in sizes.items()) == stats["inference_count"], summary
    assert sum(sizes.values()) == stats["execution_count"], summary
    assert stats["request_success"] == requests, summary
    assert stats["request_failure"] == 0, summary
    assert max(sizes) > 1, f"no batch held more than one row\n{summary}"
    assert max(sizes) <= 32, summary
    assert stats["execution_count"] < requests, summary
    # Every answered request's path is broken down by stage, and the stages fit in the handler.
    stages = stats["stages"]
    assert stages["count"] == requests, stages
    inside = ("decode", "queue", "assemble", "handoff", "infer", "split", "encode")
    assert all(stages[f"{s}_ns"] > 0 for s in (*inside, "handler")), stages
    assert sum(stages[f"{s}_ns"] for s in inside) <= stages["handler_ns"], stages
