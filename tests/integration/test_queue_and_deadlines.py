"""Back-pressure and deadlines on a dedicated server with small queues.

The repository holds the demo cnn graph three times, under configs made for each check (the
first two run on one CPU thread, so executions take a while on any host):

- `cnn`: max_batch_size 8, max_queue_size 2, 1 instance. Flooded with 40 concurrent batch-8
  requests (each fills a batch, so one executes and at most 2 wait): the rest must get
  RESOURCE_EXHAUSTED at once, every other request OK, and nothing else.
- `cnn_backlog`: max_batch_size 64, max_queue_size 64, 1 instance. Eight clients keep batch-64
  requests (~0.1 s each here) queued, so a one-row request waits behind several
  executions: one with a 50 ms gRPC deadline or a 50 ms `timeout_us` expires in the queue.
- `cnn_window`: max_batch_size 8, max_queue_delay_us 5 s, default_timeout_us 100 ms. A lone
  one-row request waits for its batch to fill, so it expires in the queue deterministically,
  without any load.

Each check then reads GetModelStatus statistics: expired and refused requests were never
executed (inference_count counts only the rows of OK responses).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from integration_support import (
    ServerFactory,
    ServerProcess,
    assert_outputs_match,
    cnn_input,
    model_file,
    predict_request,
    reference_outputs,
)

from inferd.demo_models import build_cnn, write_model
from inferd_client import AsyncInferClient, DeadlineExceededError, InferError, ServerBusyError
from inferd_wire.proto.inferd.v1 import predict_pb2_grpc

FLOOD = 40
FLOOD_ROWS = 8
BACKLOG_CLIENTS = 8
BACKLOG_ROWS = 64
# Executions take long enough (cnn batch 64: ~0.1 s here) for the queue to build up, on any host.
ONE_CPU_THREAD = 'execution_providers = ["cpu"]\nintra_op_threads = 1\n'
MEMORY_BUDGET = 3_670_016  # 3.5 MiB
# Local bound on any one wait: a hang fails the test instead of the 120 s timeout.
WAIT = 60.0


@pytest.fixture(scope="module")
def queue_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("queue_repository")
    cnn = build_cnn()
    write_model(
        cnn,
        repo,
        "cnn",
        config_toml=(
            f"max_batch_size = {FLOOD_ROWS}\nmax_queue_size = 2\ninstances = 1\n"
            f"max_queue_delay_us = 0\n{ONE_CPU_THREAD}"
        ),
    )
    write_model(
        cnn,
        repo,
        "cnn_backlog",
        config_toml=(
            f"max_batch_size = {BACKLOG_ROWS}\nmax_queue_size = 64\ninstances = 1\n"
            f"max_queue_delay_us = 0\n{ONE_CPU_THREAD}"
        ),
    )
    write_model(
        cnn,
        repo,
        "cnn_window",
        config_toml=(
            "max_batch_size = 8\nmax_queue_size = 64\ninstances = 1\n"
            "max_queue_delay_us = 5000000\ndefault_timeout_us = 100000\n"
        ),
    )
    # Each 8-row request: 393,216 input bytes, estimated 4x: 1.5 MiB; two fit in 3.5 MiB.
    write_model(
        cnn,
        repo,
        "cnn_memory",
        config_toml=(
            "max_batch_size = 8\nmax_queue_size = 64\ninstances = 1\nmax_queue_delay_us = 0\n"
            f"request_memory_factor = 4.0\nmax_request_bytes_in_flight = {MEMORY_BUDGET}\n"
            f"{ONE_CPU_THREAD}"
        ),
    )
    return repo


@pytest.fixture(scope="module")
def queue_server(module_server_factory: ServerFactory, queue_repository: Path) -> ServerProcess:
    return module_server_factory(queue_repository)


async def _statistics(target: str, model: str) -> dict:
    async with AsyncInferClient(target) as client:
        return (await client.status(model, timeout=WAIT))[0].statistics


async def test_flooded_queue_refuses_with_resource_exhausted_and_serves_the_rest(
    queue_server: ServerProcess, queue_repository: Path
):
    x = cnn_input(np.random.default_rng(80), FLOOD_ROWS)
    expected = reference_outputs(model_file(queue_repository, "cnn"), x)

    async with AsyncInferClient(queue_server.target) as client:

        async def one() -> tuple[grpc.StatusCode, dict[str, np.ndarray] | None]:
            try:
                return grpc.StatusCode.OK, await client.infer("cnn", x, timeout=WAIT)
            except InferError as exc:
                return exc.code, None

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(FLOOD))), WAIT)

    codes = [code for code, _ in results]
    counts = {code.name: codes.count(code) for code in set(codes)}
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, counts
    ok = codes.count(grpc.StatusCode.OK)
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    print(f"\nflood of {FLOOD} batch-{FLOOD_ROWS} requests: {counts}")
    assert ok >= 1 and refused >= 1, counts
    for _, outputs in results:
        if outputs is not None:
            assert_outputs_match(outputs, expected, "flooded cnn")

    stats = await _statistics(queue_server.target, "cnn")
    assert stats["inference_count"] == ok * FLOOD_ROWS, (counts, stats)
    assert stats["batch_sizes"] == {FLOOD_ROWS: ok}, (counts, stats)
    assert stats["request_success"] == ok, (counts, stats)
    assert stats["request_failure"] == refused, (counts, stats)


async def test_refusal_names_the_model_and_its_queue_size(queue_server: ServerProcess):
    x = cnn_input(np.random.default_rng(81), FLOOD_ROWS)
    async with AsyncInferClient(queue_server.target) as client:

        async def one() -> InferError | None:
            try:
                await client.infer("cnn", x, timeout=WAIT)
            except InferError as exc:
                return exc
            return None

        errors = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(FLOOD))), WAIT)
    busy = [e for e in errors if e is not None]
    assert busy and all(isinstance(e, ServerBusyError) for e in busy), busy
    assert "'cnn'" in busy[0].details and "max_queue_size=2" in busy[0].details, busy[0]


async def _raw_predict(channel: grpc.aio.Channel, request, grpc_deadline: float | None):
    """One Predict over the raw stub: (OK, response) or (code, details)."""
    stub = predict_pb2_grpc.PredictStub(channel)
    try:
        return grpc.StatusCode.OK, await stub.Predict(request, timeout=grpc_deadline)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()


async def test_requests_expire_in_a_busy_queue_and_are_never_executed(
    queue_server: ServerProcess,
):
    target = queue_server.target
    big = cnn_input(np.random.default_rng(82), BACKLOG_ROWS)
    small = cnn_input(np.random.default_rng(83), 1)
    stop = asyncio.Event()
    answered = asyncio.Event()
    backlog_codes: list[grpc.StatusCode] = []

    async def keep_busy(client: AsyncInferClient) -> None:
        while not stop.is_set():
            try:
                await client.infer("cnn_backlog", big, timeout=WAIT)
                backlog_codes.append(grpc.StatusCode.OK)
            except InferError as exc:
                backlog_codes.append(exc.code)
            answered.set()

    async with AsyncInferClient(target) as client, grpc.aio.insecure_channel(target) as channel:
        loopers = [asyncio.create_task(keep_busy(client)) for _ in range(BACKLOG_CLIENTS)]
        try:
            # Once a first batch came back, the others are queued behind the next execution.
            await asyncio.wait_for(answered.wait(), WAIT)

            # Behind ~1 s of queued work, a 50 ms budget is refused on arrival (shed) once a
            # batch time has been measured, or expires in the queue; never executed either way.
            with pytest.raises((DeadlineExceededError, ServerBusyError)):
                await asyncio.wait_for(client.infer("cnn_backlog", small, timeout=0.05), WAIT)

            # timeout_us alone (no gRPC deadline): the server itself answers.
            request = predict_request("cnn_backlog", small, timeout_us=50_000)
            code, details = await asyncio.wait_for(_raw_predict(channel, request, None), WAIT)
            assert code in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ), details

            # Shed requests are answered at once, not at their deadline.
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ServerBusyError, match="overloaded"):
                await asyncio.wait_for(client.infer("cnn_backlog", small, timeout=0.2), WAIT)
            assert loop.time() - started < 0.1

            request = predict_request("cnn_backlog", small, timeout_us=1)
            code, details = await asyncio.wait_for(_raw_predict(channel, request, None), WAIT)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*loopers), WAIT)

    assert set(backlog_codes) == {grpc.StatusCode.OK}, backlog_codes
    stats = await _statistics(target, "cnn_backlog")
    ok_rows = BACKLOG_ROWS * len(backlog_codes)
    assert stats["inference_count"] == ok_rows, stats
    assert stats["batch_sizes"] == {BACKLOG_ROWS: len(backlog_codes)}, stats
    assert stats["request_success"] == len(backlog_codes), stats


async def test_requests_expire_while_waiting_for_a_batch_to_fill(queue_server: ServerProcess):
    """cnn_window holds a lone request up to 5 s for its batch to fill; each request's own
    deadline (gRPC, timeout_us, or the model's default_timeout_us of 100 ms) ends it first,
    and nothing is ever executed."""
    target = queue_server.target
    x = cnn_input(np.random.default_rng(84), 1)
    async with AsyncInferClient(target) as client, grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(client.infer("cnn_window", x, timeout=0.05), WAIT)

        requests = {
            "timeout_us": predict_request("cnn_window", x, timeout_us=50_000),
            "default_timeout_us": predict_request("cnn_window", x),
            "timeout_us under a longer gRPC deadline": predict_request(
                "cnn_window", x, timeout_us=50_000
            ),
        }
        grpc_timeouts = [None, None, 30.0]
        for (what, request), grpc_timeout in zip(requests.items(), grpc_timeouts, strict=True):
            code, details = await asyncio.wait_for(
                _raw_predict(channel, request, grpc_timeout), WAIT
            )
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (what, details)
            assert "deadline" in details, (what, details)

        metadata = await client.metadata("cnn_window", timeout=WAIT)
    assert metadata.batching["default_timeout_us"] == 100_000
    stats = await _statistics(target, "cnn_window")
    assert stats["execution_count"] == 0, stats
    assert stats["inference_count"] == 0, stats
    assert stats["request_success"] == 0, stats
    assert stats["request_failure"] >= len(requests), stats


async def test_server_is_healthy_after_overload_and_expiries(
    queue_server: ServerProcess, queue_repository: Path
):
    x = cnn_input(np.random.default_rng(85), 2)
    async with AsyncInferClient(queue_server.target) as client:
        served = await client.infer("cnn", x, timeout=WAIT)
        assert await client.health(timeout=WAIT) == "SERVING"
    assert_outputs_match(served, reference_outputs(model_file(queue_repository, "cnn"), x), "cnn")


async def test_a_models_memory_budget_refuses_what_would_exceed_it_and_serves_the_rest(
    queue_server: ServerProcess,
):
    x = cnn_input(np.random.default_rng(84), FLOOD_ROWS)
    async with AsyncInferClient(queue_server.target) as client:

        async def one() -> tuple[grpc.StatusCode, str]:
            try:
                await client.infer("cnn_memory", x, timeout=WAIT)
                return grpc.StatusCode.OK, ""
            except InferError as exc:
                return exc.code, exc.details

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(FLOOD))), WAIT)
        codes = [code for code, _ in results]
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
        refused = [m for code, m in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert all("max_request_bytes_in_flight of 3670016" in m for m in refused), refused
        # Everything was given back: alone, a request is served.
        await client.infer("cnn_memory", x, timeout=WAIT)
