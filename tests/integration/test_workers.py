"""`inferd serve --workers N` against real subprocesses on loopback: one supervisor, one engine
process (the registry, batchers and sessions) and N frontend processes sharing the gRPC port
(SO_REUSEPORT), which send inference requests to the engine over a Unix socket (large tensors
through /dev/shm) and forward every other RPC to the engine's own gRPC socket.

What is pinned here: both frontends answer when callers open several connections; every
counter (ModelStatus, OIP ModelStatistics, Prometheus) counts exactly the requests sent,
whichever frontend took them; outputs equal in-process ONNX Runtime's, and no shared-memory
object outlives the server; deadlines, cancellations and a full queue are answered through the
engine as by one process, and nothing refused is executed; a new version rolls out under load
without a failed request; SIGTERM drains under load and exits 0; a frontend or the engine that
dies is restarted while the rest keeps answering (or refuses UNAVAILABLE, never hangs); the
RPCs that are not inference are forwarded, the control token included.

Callers open connections of their own (gRPC keeps one connection per address for all of a
process's channels of equal arguments, see inferd_client/_channel.py): a connection goes to one
frontend, chosen by the kernel. Every wait is a poll with a bound; load is bounded in count or
in time by those bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration_support import (
    Callers,
    LogWatch,
    ServerFactory,
    ServerProcess,
    assert_outputs_match,
    cnn_input,
    echo_input,
    mlp_input,
    model_file,
    predict_request,
    reference_outputs,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from inferd.demo_models import (
    CNN_CONFIG,
    MLP_CONFIG,
    build_adder,
    build_cnn,
    build_echo_bytes,
    build_mlp,
    write_model,
)
from inferd_client import (
    AsyncInferClient,
    DeadlineExceededError,
    InferError,
    StreamRequest,
)
from inferd_wire.codec import from_wire, to_wire
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2,
    model_repository_pb2_grpc,
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2_grpc,
)
from inferd_wire.proto.inference import grpc_service_pb2 as oip_pb2
from inferd_wire.proto.inference import grpc_service_pb2_grpc as oip_grpc

WORKERS = 2
WORKERS_ARGS = ("--workers", str(WORKERS))
TOKEN = "workers-test-token"
# Bound of every wait and of every call's deadline (a hang fails the test, not the timeout).
WAIT = 30.0
RPC_TIMEOUT = 10.0
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SHM_DIR = Path("/dev/shm")
# The cnn's executions take a while on any host on one thread (test_queue_and_deadlines.py).
ONE_CPU_THREAD = 'execution_providers = ["cpu"]\nintra_op_threads = 1\n'
# Above the default ipc_shm_threshold_bytes (256 KiB): these cross through /dev/shm.
LARGE_CNN_ROWS = 8  # 8 * 3 * 64 * 64 * 4 = 393,216 bytes
LARGE_TEXT = 100_000  # bytes per echo_bytes element, 4 elements

FRONTEND_LINE = re.compile(r"frontend pid (\d+) listening on 127\.0\.0\.1:(\d+)")
ENGINE_LINE = re.compile(r"engine pid (\d+) holds (\d+) model\(s\)")
SUPERVISOR_STOPPED = re.compile(r'"logger": "inferd\.workers", "message": "inferd stopped ')


# --- models ------------------------------------------------------------------------------------


def adder_input(rows: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Small integers, so that x + c is exact in FP32."""
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + offset
    return {"x": x}


@pytest.fixture(scope="module")
def workers_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("workers_repository")
    mlp, cnn = build_mlp(), build_cnn()
    write_model(mlp, repo, "mlp", config_toml=MLP_CONFIG)
    write_model(cnn, repo, "cnn", config_toml=CNN_CONFIG)
    write_model(build_echo_bytes(), repo, "echo_bytes")
    # Counted by test_counts_...: nobody else sends to it.
    write_model(build_adder(1.0), repo, "counted", config_toml="max_batch_size = 8\n")
    # A lone request waits 5 s for its batch to fill: its deadline ends it first.
    write_model(
        mlp,
        repo,
        "mlp_window",
        config_toml="max_batch_size = 8\nmax_queue_size = 64\nmax_queue_delay_us = 5000000\n",
    )
    # A lone request waits 2 s for its batch to fill: time to cancel it in the queue.
    write_model(
        mlp, repo, "mlp_hold", config_toml="max_batch_size = 8\nmax_queue_delay_us = 2000000\n"
    )
    # One batch of 8 executes and at most 2 wait: a flood is refused RESOURCE_EXHAUSTED.
    write_model(
        cnn,
        repo,
        "cnn_small_queue",
        config_toml=(
            "max_batch_size = 8\nmax_queue_size = 2\ninstances = 1\nmax_queue_delay_us = 0\n"
            f"{ONE_CPU_THREAD}"
        ),
    )
    # A lone request waits 3 s for its batch; at most 2 wait: the third is refused.
    write_model(
        mlp,
        repo,
        "mlp_small_queue",
        config_toml="max_batch_size = 8\nmax_queue_size = 2\nmax_queue_delay_us = 3000000\n",
    )
    # Unloaded and loaded again by the control-plane test.
    write_model(build_adder(5.0), repo, "spare")
    return repo


def start_workers(
    factory: ServerFactory,
    repository: Path,
    env: dict[str, str] | None = None,
    flag: bool = True,
) -> ServerProcess:
    """A server of WORKERS frontends: `--workers`, or INFERD_WORKERS when not `flag`."""
    if flag:
        server = factory(repository, env=env, extra_args=WORKERS_ARGS)
    else:
        server = factory(repository, env={**(env or {}), "INFERD_WORKERS": str(WORKERS)})
    pids = frontend_pids(server)
    assert len(pids) == WORKERS and len(set(pids)) == WORKERS, server.describe()
    return server


@pytest.fixture(scope="module")
def workers_server(module_server_factory: ServerFactory, workers_repository: Path) -> ServerProcess:
    """--workers 2, explicit model control with a control token (every model loaded at the
    start); shared by the tests that neither stop nor break it."""
    return start_workers(
        module_server_factory,
        workers_repository,
        env={
            "INFERD_MODEL_CONTROL": "explicit",
            "INFERD_CONTROL_TOKEN": TOKEN,
            "INFERD_SETTLE_S": "0.2",
        },
    )


# --- the server's log ----------------------------------------------------------------------------


def frontend_pids(server: ServerProcess) -> list[int]:
    """Every frontend that said it listens, in order (a restarted one comes last)."""
    return [int(m.group(1)) for m in FRONTEND_LINE.finditer(server.log_text())]


def engine_pids(server: ServerProcess) -> list[int]:
    return [int(m.group(1)) for m in ENGINE_LINE.finditer(server.log_text())]


def restart_line(role_name: str, pid: int) -> re.Pattern[str]:
    """The supervisor's line for a process it restarts (`role_name`: "engine", "frontend 0")."""
    return re.compile(rf"{role_name} \(pid {pid}\) exited with (-?\d+) after [\d.]+ s; restarting")


# --- /metrics ------------------------------------------------------------------------------------


def scrape(server: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the engine's /metrics (all processes aggregated): (name, labels, value)."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as response:
        text = response.read().decode()
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def scrape_async(server: ServerProcess) -> list[tuple[str, dict[str, str], float]]:
    return await asyncio.to_thread(scrape, server)


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of `name` over the samples carrying every label given."""
    return sum(
        value
        for n, have, value in samples
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )


def by_label(
    samples: list[tuple[str, dict[str, str], float]], name: str, label: str, **labels: str
) -> dict[str, float]:
    """`name` summed per value of `label`, over the samples carrying every label given."""
    out: dict[str, float] = {}
    for n, have, value in samples:
        if n == name and label in have and all(have.get(k) == v for k, v in labels.items()):
            out[have[label]] = out.get(have[label], 0.0) + value
    return out


# --- waiting -------------------------------------------------------------------------------------


# --- connections and raw calls ----------------------------------------------------------------


def own_connection(index: int) -> list[tuple[str, object]]:
    """Channel options that give a channel a connection of its own (a frontend of its own)."""
    return [("grpc.use_local_subchannel_pool", 1), ("inferd.test.connection", index)]


@contextlib.asynccontextmanager
async def channels(target: str, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
    opened = [grpc.aio.insecure_channel(target, options=own_connection(i)) for i in range(count)]
    try:
        yield opened
    finally:
        for channel in opened:
            await channel.close()


def oip_request(
    model: str, inputs: dict[str, np.ndarray], id: str = ""
) -> oip_pb2.ModelInferRequest:
    request = oip_pb2.ModelInferRequest(model_name=model, id=id)
    for name, array in inputs.items():
        datatype, shape, contents = to_wire(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(contents)
    return request


def oip_outputs(response: oip_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        o.name: from_wire(o.datatype, list(o.shape), raw)
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


async def health_of(target: str) -> int | grpc.StatusCode:
    """grpc.health.v1 status of the server, over a connection of its own (any frontend)."""
    async with grpc.aio.insecure_channel(target, options=own_connection(-1)) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return response.status


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


def shm_entries(server: ServerProcess) -> list[str]:
    """/dev/shm objects of this server (named after the supervisor's pid)."""
    prefix = f"inferd-{server.process.pid}-"
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ChannelLoad(Callers):
    """`count` callers, each on a connection of its own and without retries, sending one mlp
    request after another until stopped; every outcome is kept per caller with its time."""

    def __init__(self, target: str, count: int, model: str = "mlp") -> None:
        super().__init__(count)
        self.target = target
        self.model = model
        # Per caller: (monotonic end time, code name, seconds the call took).
        self.outcomes: list[list[tuple[float, str, float]]] = [[] for _ in range(count)]

    async def _caller(self, i: int) -> None:
        x = mlp_input(np.random.default_rng(500 + i), 1)
        async with AsyncInferClient(self.target, options=own_connection(i), retries=0) as client:
            while not self.stopping:
                started = time.monotonic()
                try:
                    out = await client.infer(self.model, x, timeout=RPC_TIMEOUT)
                    assert out["probabilities"].shape == (1, 10)
                    code = "OK"
                except InferError as exc:
                    code = exc.code.name
                ended = time.monotonic()
                self.outcomes[i].append((ended, code, ended - started))
                if code != "OK":
                    await asyncio.sleep(0.01)

    def ok_since(self, i: int, since: float, until: float = float("inf")) -> int:
        return sum(1 for t, code, _ in self.outcomes[i] if code == "OK" and since <= t <= until)

    async def each_answered(self, count: int, since: float) -> None:
        """Until every caller has `count` OK answers that ended after `since`."""

        def done() -> bool:
            self.check_running()
            return all(self.ok_since(i, since) >= count for i in range(len(self.outcomes)))

        await wait_until(done, f"every caller answered {count} times")

    def failures(self) -> list[tuple[int, float, str, float]]:
        return [
            (i, t, code, took)
            for i, outcomes in enumerate(self.outcomes)
            for t, code, took in outcomes
            if code != "OK"
        ]

    def tally(self) -> dict[str, int]:
        return dict(Counter(code for outcomes in self.outcomes for _, code, _ in outcomes))


# --- 1. both frontends answer ----------------------------------------------------------------


async def test_two_workers_on_one_port_both_answer(workers_server: ServerProcess) -> None:
    server = workers_server
    watch = LogWatch(server)
    frontends = {str(pid) for pid in frontend_pids(server)}
    (engine,) = engine_pids(server)
    before = by_label(await scrape_async(server), "inferd_worker_requests_total", "worker_pid")

    connections, rounds = 16, 4
    x = mlp_input(np.random.default_rng(1), 1)
    async with AsyncInferClient(server.target, connections=connections, retries=0) as client:
        for _ in range(rounds):
            # One call per channel each round: every connection carries `rounds` calls.
            calls = [client.infer("mlp", x, timeout=RPC_TIMEOUT) for _ in range(connections)]
            await asyncio.gather(*calls)
    sent = connections * rounds

    samples: list[tuple[str, dict[str, str], float]] = []

    async def all_counted() -> bool:
        nonlocal samples
        samples = await scrape_async(server)
        after = by_label(samples, "inferd_worker_requests_total", "worker_pid")
        return sum(after.values()) - sum(before.values()) >= sent

    await wait_until(all_counted, f"{sent} requests in inferd_worker_requests_total", 5.0)
    after = by_label(samples, "inferd_worker_requests_total", "worker_pid")
    answered = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    print(f"\n{sent} requests over {connections} connections, answered per frontend: {answered}")
    assert set(after) == frontends, (after, frontends)
    assert all(n > 0 for n in answered.values()), answered
    assert sum(answered.values()) == sent, answered

    assert total(samples, "inferd_workers", role="frontend") == WORKERS
    assert total(samples, "inferd_workers", role="engine") == 1
    processes = by_label(samples, "inferd_worker_process", "worker_pid", role="frontend")
    assert processes == {pid: 1.0 for pid in frontends}, processes
    engines = by_label(samples, "inferd_worker_process", "worker_pid", role="engine")
    assert engines == {str(engine): 1.0}, engines
    assert total(samples, "inferd_worker_restarts_total") == 0
    # The byte budget is the server's, split over the frontends: /metrics shows the whole.
    assert total(samples, "inferd_request_bytes_budget") == 1024**3
    watch.assert_clean()


# --- 2. counters --------------------------------------------------------------------------------


async def test_counts_match_requests_sent_across_workers(workers_server: ServerProcess) -> None:
    """Native Predict and PredictStream, OIP ModelInfer and ModelStreamInfer, over several
    connections: every counter of `counted` says exactly what was sent."""
    server = workers_server
    target = server.target
    watch = LogWatch(server)
    worker_requests_before = total(await scrape_async(server), "inferd_worker_requests_total")

    native_rows = [1 + i % 3 for i in range(24)]
    stream_rows = [2, 1, 3, 1, 2, 2]
    oip_rows = [1 + i % 2 for i in range(12)]
    oip_stream_rows = [3, 1, 2, 1]

    async with AsyncInferClient(target, connections=4, retries=0) as client:
        outs = await asyncio.gather(
            *(
                client.infer("counted", adder_input(r, i), timeout=RPC_TIMEOUT)
                for i, r in enumerate(native_rows)
            )
        )
        for i, (r, out) in enumerate(zip(native_rows, outs, strict=True)):
            np.testing.assert_array_equal(out["y"], adder_input(r, i)["x"] + 1)
        requests = [
            StreamRequest("counted", adder_input(r), request_id=f"s{i}")
            for i, r in enumerate(stream_rows)
        ]
        results = [result async for result in client.infer_stream(requests)]
        assert sorted(r.request_id for r in results if r.ok) == sorted(
            f"s{i}" for i in range(len(stream_rows))
        ), [r.error for r in results]

    async with channels(target, 3) as oip_channels:
        stubs = [oip_grpc.GRPCInferenceServiceStub(c) for c in oip_channels]
        responses = await asyncio.gather(
            *(
                stubs[i % 3].ModelInfer(
                    oip_request("counted", adder_input(r, i)), timeout=RPC_TIMEOUT
                )
                for i, r in enumerate(oip_rows)
            )
        )
        for i, (r, response) in enumerate(zip(oip_rows, responses, strict=True)):
            np.testing.assert_array_equal(oip_outputs(response)["y"], adder_input(r, i)["x"] + 1)
        stream_requests = [
            oip_request("counted", adder_input(r), id=f"o{i}")
            for i, r in enumerate(oip_stream_rows)
        ]
        stream = stubs[0].ModelStreamInfer(stream_requests, timeout=RPC_TIMEOUT)
        streamed = [message async for message in stream]
        assert [m.error_message for m in streamed] == [""] * len(oip_stream_rows)
        assert sorted(m.infer_response.id for m in streamed) == sorted(
            f"o{i}" for i in range(len(oip_stream_rows))
        )

        native_sent = len(native_rows) + len(stream_rows)
        oip_sent = len(oip_rows) + len(oip_stream_rows)
        sent = native_sent + oip_sent
        rows = sum(native_rows) + sum(stream_rows) + sum(oip_rows) + sum(oip_stream_rows)

        async with AsyncInferClient(target, retries=0) as client:
            status: dict = {}

            async def stages_arrived() -> bool:
                # The frontends' own stages (decode, encode) reach the engine every 0.1 s.
                nonlocal status
                (version,) = await client.status("counted", timeout=RPC_TIMEOUT)
                status = version.statistics
                return status["stages"]["count"] >= sent

            await wait_until(stages_arrived, "the frontends' stages in ModelStatus", 5.0)
        assert status["request_success"] == sent, status
        assert status["request_failure"] == 0, status
        assert status["inference_count"] == rows, status
        assert status["stages"]["count"] == sent, status
        assert sum(status["batch_sizes"].values()) == status["execution_count"], status
        assert sum(size * n for size, n in status["batch_sizes"].items()) == rows, status

        response = await stubs[1].ModelStatistics(
            oip_pb2.ModelStatisticsRequest(name="counted"), timeout=RPC_TIMEOUT
        )
        (oip_stats,) = response.model_stats
        assert oip_stats.inference_stats.success.count == sent, oip_stats
        assert oip_stats.inference_stats.fail.count == 0, oip_stats
        assert oip_stats.inference_count == rows, oip_stats
        assert oip_stats.execution_count == status["execution_count"], oip_stats

    samples = await scrape_async(server)
    ok = by_label(samples, "inferd_requests_total", "protocol", model="counted", code="OK")
    assert ok == {"native": native_sent, "oip": oip_sent}, ok
    codes = by_label(samples, "inferd_requests_total", "code", model="counted")
    assert {c: n for c, n in codes.items() if n} == {"OK": sent}, codes
    assert total(samples, "inferd_inference_count_total", model="counted") == rows
    executions = total(samples, "inferd_execution_count_total", model="counted")
    assert executions == status["execution_count"], executions
    answered = total(samples, "inferd_worker_requests_total") - worker_requests_before
    assert answered == sent, answered
    print(
        f"\ncounted: {sent} requests ({native_sent} native, {oip_sent} OIP), {rows} rows, "
        f"{status['execution_count']} batches {status['batch_sizes']}"
    )
    watch.assert_clean()


# --- 3. outputs ---------------------------------------------------------------------------------


async def test_outputs_match_onnxruntime_through_the_engine_and_no_shared_memory_remains(
    start_server: ServerFactory, workers_repository: Path
) -> None:
    server = start_workers(start_server, workers_repository)
    watch = LogWatch(server)
    rng = np.random.default_rng(3)
    repo = workers_repository

    # A batched model: concurrent requests of 1-4 rows over 4 connections, batched together
    # in the engine whichever frontend took them.
    mlp_inputs = [mlp_input(rng, 1 + i % 4) for i in range(24)]
    large_cnn = cnn_input(rng, LARGE_CNN_ROWS)
    large_text = echo_input([chr(ord("a") + i) * LARGE_TEXT for i in range(4)])
    assert large_cnn["image"].nbytes > 256 * 1024
    small_text = echo_input(["", "two words", "\u00e9t\u00e9 \u2603", "x" * 300])
    async with AsyncInferClient(server.target, connections=4, retries=0) as client:
        served = await asyncio.gather(
            *(client.infer("mlp", x, timeout=RPC_TIMEOUT) for x in mlp_inputs)
        )
        for i, (x, out) in enumerate(zip(mlp_inputs, served, strict=True)):
            assert_outputs_match(out, reference_outputs(model_file(repo, "mlp"), x), f"mlp {i}")

        for name, x in (
            ("echo_bytes", small_text),
            ("cnn", large_cnn),  # input through shared memory
            ("echo_bytes", large_text),  # input and output through shared memory
        ):
            for attempt in range(2):
                out = await client.infer(name, x, timeout=RPC_TIMEOUT)
                expected = reference_outputs(model_file(repo, name), x)
                assert_outputs_match(out, expected, f"{name} #{attempt}")

    # The same large tensors over the OIP frontend.
    async with channels(server.target, 2) as (one, two):
        for channel, (name, x) in ((one, ("cnn", large_cnn)), (two, ("echo_bytes", large_text))):
            response = await oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                oip_request(name, x), timeout=RPC_TIMEOUT
            )
            expected = reference_outputs(model_file(repo, name), x)
            assert_outputs_match(oip_outputs(response), expected, f"OIP {name}")

    # Every shared tensor was unlinked by its reader as it was read.
    await wait_until(lambda: shm_entries(server) == [], "no shared tensor left while serving", 2.0)
    statuses = {}
    async with AsyncInferClient(server.target, retries=0) as client:
        statuses = {m: (await client.status(m))[0].statistics for m in ("mlp", "cnn")}
    print(
        f"\nmlp batches {statuses['mlp']['batch_sizes']}; cnn batches "
        f"{statuses['cnn']['batch_sizes']}"
    )
    assert statuses["mlp"]["request_success"] == len(mlp_inputs)
    watch.assert_clean()

    rc = server.stop()
    assert rc == 0, server.describe()
    assert shm_entries(server) == [], "shared-memory objects outlived the server"


# --- 4. deadline, cancel, full queue -------------------------------------------------------------


async def _statistics(target: str, model: str) -> dict:
    async with AsyncInferClient(target, retries=0) as client:
        (version,) = await client.status(model, timeout=RPC_TIMEOUT)
        return version.statistics


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_executed(
    workers_server: ServerProcess,
) -> None:
    """mlp_window holds a lone request 5 s for its batch to fill: each request's deadline
    (the gRPC one, or timeout_us alone) ends it first, in the engine's queue."""
    target = workers_server.target
    x = mlp_input(np.random.default_rng(4), 1)
    loop = asyncio.get_running_loop()
    async with (
        AsyncInferClient(target, retries=0) as client,
        grpc.aio.insecure_channel(target, options=own_connection(1)) as channel,
    ):
        started = loop.time()
        with pytest.raises(DeadlineExceededError):
            await client.infer("mlp_window", x, timeout=0.3)

        request = predict_request("mlp_window", x, timeout_us=200_000)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await predict_pb2_grpc.PredictStub(channel).Predict(request)  # no gRPC deadline
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, expired.value
        assert "deadline" in (expired.value.details() or ""), expired.value.details()
        # Answered at the deadline, long before the batch window would have run it.
        assert loop.time() - started < 2.5

    stats: dict = {}

    async def both_counted() -> bool:
        nonlocal stats
        stats = await _statistics(target, "mlp_window")
        return bool(stats["request_failure"] >= 2)

    await wait_until(both_counted, "two failures of mlp_window", 5.0)
    assert stats["request_failure"] == 2, stats
    assert stats["request_success"] == 0, stats
    assert stats["execution_count"] == 0, stats
    assert stats["inference_count"] == 0, stats
    samples = await scrape_async(workers_server)
    rejected = by_label(samples, "inferd_rejections_total", "reason", model="mlp_window")
    assert {r: n for r, n in rejected.items() if n} == {"deadline": 2}, rejected
    assert total(samples, "inferd_queue_depth", model="mlp_window") == 0


async def test_a_cancelled_request_is_never_executed(workers_server: ServerProcess) -> None:
    """A request waiting in mlp_hold's 2 s batch window is cancelled by its caller: the
    frontend tells the engine, which takes it out of the queue; it never runs."""
    server = workers_server
    target = server.target
    x = mlp_input(np.random.default_rng(5), 1)

    async def queue_depth() -> float:
        return total(await scrape_async(server), "inferd_queue_depth", model="mlp_hold")

    async with grpc.aio.insecure_channel(target, options=own_connection(2)) as channel:
        sent = time.monotonic()
        call = predict_pb2_grpc.PredictStub(channel).Predict(
            predict_request("mlp_hold", x), timeout=RPC_TIMEOUT
        )
        waiting = asyncio.ensure_future(call)

        async def queued() -> bool:
            return await queue_depth() == 1

        await wait_until(queued, "the request queued in the engine", 1.5)
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    async def unqueued() -> bool:
        return await queue_depth() == 0

    await wait_until(unqueued, "the cancelled request out of the queue")
    # Past the batch window: had it stayed queued, it would have run by now.
    await asyncio.sleep(max(2.5 - (time.monotonic() - sent), 0))
    stats = await _statistics(target, "mlp_hold")
    assert stats["execution_count"] == 0, stats
    assert stats["inference_count"] == 0, stats
    assert stats["request_success"] == 0, stats
    assert stats["request_failure"] == 1, stats
    samples = await scrape_async(server)
    rejected = by_label(samples, "inferd_rejections_total", "reason", model="mlp_hold")
    assert {r: n for r, n in rejected.items() if n} == {"cancelled": 1}, rejected


async def test_a_full_queue_answers_resource_exhausted_at_once(
    workers_server: ServerProcess,
) -> None:
    """mlp_small_queue holds requests 3 s for a batch and queues at most 2: with two waiting
    (sent over two connections), every further request, over any connection, is refused at
    once, long before the window ends; the two waiting run in one batch at its end."""
    server = workers_server
    target = server.target
    window = 3.0
    x = mlp_input(np.random.default_rng(6), 1)
    before = await _statistics(target, "mlp_small_queue")

    async def queue_depth() -> float:
        return total(await scrape_async(server), "inferd_queue_depth", model="mlp_small_queue")

    async with channels(target, 6) as opened:
        stubs = [predict_pb2_grpc.PredictStub(c) for c in opened]
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in opened)), WAIT)
        request = predict_request("mlp_small_queue", x)
        sent = time.monotonic()
        waiting = [asyncio.ensure_future(stub.Predict(request, timeout=WAIT)) for stub in stubs[:2]]

        async def full() -> bool:
            return await queue_depth() == 2

        await wait_until(full, "two requests waiting in the engine's queue", window / 2)
        refusals: list[tuple[grpc.StatusCode, float, str]] = []
        for stub in stubs[2:]:
            started = time.monotonic()
            try:
                await stub.Predict(request, timeout=WAIT)
                refusals.append((OK, time.monotonic() - started, ""))
            except grpc.aio.AioRpcError as exc:
                refusals.append((exc.code(), time.monotonic() - started, exc.details() or ""))
        refused_by = time.monotonic() - sent
        answers = await asyncio.wait_for(asyncio.gather(*waiting), WAIT)

    report = f"refusals {[(c.name, round(t, 3)) for c, t, _ in refusals]}"
    print(f"\n{report}")
    assert [c for c, _, _ in refusals] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4, refusals
    assert all("max_queue_size=2" in details for _, _, details in refusals), refusals
    # At once: every refusal came back well inside the batch window the queued ones waited.
    assert refused_by < window / 2 and max(t for _, t, _ in refusals) < window / 4, report
    assert all(len(a.outputs) == 1 for a in answers)

    stats = await _statistics(target, "mlp_small_queue")
    counts = ("request_success", "request_failure", "execution_count", "inference_count")
    done = {k: stats[k] - before[k] for k in counts}
    assert done == {
        "request_success": 2,
        "request_failure": 4,
        "execution_count": 1,
        "inference_count": 2,
    }, stats
    samples = await scrape_async(server)
    rejected = by_label(samples, "inferd_rejections_total", "reason", model="mlp_small_queue")
    assert {r: n for r, n in rejected.items() if n} == {"queue_full": 4}, rejected


async def test_a_flooded_queue_refuses_the_excess_and_executes_only_what_it_accepted(
    workers_server: ServerProcess, workers_repository: Path
) -> None:
    """cnn_small_queue: one batch of 8 executes, at most 2 wait. A flood of batch-8 requests
    (each through shared memory) over several connections: OK or RESOURCE_EXHAUSTED, and only
    the accepted ones executed."""
    target = workers_server.target
    flood = 30
    x = cnn_input(np.random.default_rng(6), 8)
    expected = reference_outputs(model_file(workers_repository, "cnn_small_queue"), x)
    before = await _statistics(target, "cnn_small_queue")

    async with AsyncInferClient(target, connections=6, retries=0) as client:

        async def one() -> tuple[str, str]:
            try:
                out = await client.infer("cnn_small_queue", x, timeout=WAIT)
                assert_outputs_match(out, expected, "cnn_small_queue")
                return "OK", ""
            except InferError as exc:
                return exc.code.name, exc.details

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(flood))), WAIT)

    codes = Counter(code for code, _ in results)
    print(f"\nflood of {flood} batch-8 cnn requests: {dict(codes)}")
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    refused = [details for code, details in results if code == "RESOURCE_EXHAUSTED"]
    assert all("max_queue_size=2" in d for d in refused), refused[:3]

    stats = await _statistics(target, "cnn_small_queue")
    done = {k: stats[k] - before[k] for k in ("request_success", "request_failure")}
    assert done == {"request_success": codes["OK"], "request_failure": len(refused)}, stats
    assert stats["inference_count"] - before["inference_count"] == 8 * codes["OK"], stats
    await wait_until(lambda: shm_entries(workers_server) == [], "no shared tensor left", 2.0)


# --- 5. reload under load -----------------------------------------------------------------------


def publish(model_dir: Path, version: int, c: float) -> None:
    """A new version, renamed into place in one step (safe for a poller)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".publish-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(build_adder(c).SerializeToString(deterministic=True))
    os.rename(staging, model_dir / str(version))


async def test_reload_under_load_over_several_connections_fails_no_request(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """Poll mode: v2 then v3 of `rollout` (y = x + version) are copied in while 8 callers, each
    on a connection of its own and without retries, send without pause."""
    repository = tmp_path / "repository"
    publish(repository / "rollout", 1, 1.0)
    server = start_workers(
        start_server,
        repository,
        env={
            "INFERD_MODEL_CONTROL": "poll",
            "INFERD_POLL_INTERVAL_S": "0.2",
            "INFERD_SETTLE_S": "0.2",
        },
        flag=False,  # INFERD_WORKERS: the setting works from the environment too
    )
    callers, per_step = 8, 15
    answers: list[list[tuple[int, float]]] = [[] for _ in range(callers)]
    failures: list[tuple[int, str, str]] = []
    stop = asyncio.Event()

    async def caller(i: int, channel: grpc.aio.Channel) -> None:
        x = adder_input(1, 10 * i)["x"]
        request = predict_request("rollout", {"x": x})
        stub = predict_pb2_grpc.PredictStub(channel)
        while not stop.is_set():
            try:
                response = await stub.Predict(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                failures.append((i, exc.code().name, exc.details() or ""))
                await asyncio.sleep(0.01)
                continue
            (tensor,) = response.outputs
            y = from_wire(tensor.datatype, list(tensor.shape), tensor.contents)
            added = np.unique(y - x)
            answers[i].append((response.version, float(added[0]) if len(added) == 1 else -1.0))

    async def each_answered(version: int) -> None:
        base = [sum(1 for v, _ in a if v == version) for a in answers]

        def done() -> bool:
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return all(
                sum(1 for v, _ in a if v == version) >= base[i] + per_step
                for i, a in enumerate(answers)
            )

        await wait_until(done, f"every caller answered by v{version}")

    async with channels(server.target, callers) as opened:
        tasks = [asyncio.create_task(caller(i, c)) for i, c in enumerate(opened)]
        try:
            await each_answered(1)
            for version in (2, 3):
                publish(repository / "rollout", version, float(version))
                await each_answered(version)
        finally:
            stop.set()
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*tasks, return_exceptions=True)
        status = await model_status_pb2_grpc.ModelStatusStub(opened[0]).GetModelStatus(
            model_status_pb2.GetModelStatusRequest(model="rollout"), timeout=RPC_TIMEOUT
        )

    per_version = Counter(v for a in answers for v, _ in a)
    print(
        f"\nrollout v1->v2->v3 under {callers} callers: {sum(per_version.values())} answered "
        f"{dict(sorted(per_version.items()))}, {len(failures)} failed"
    )
    assert failures == [], f"{len(failures)} failed, e.g. {failures[:3]}"
    for i, a in enumerate(answers):
        wrong = [(v, c) for v, c in a if c != float(v)]
        assert wrong == [], f"caller {i}: outputs that are not x + version: {wrong[:5]}"
        versions = [v for v, _ in a]
        assert versions == sorted(versions), f"caller {i} went back to an older version"
    states = {v.version: model_status_pb2.ModelState.Name(v.state) for v in status.versions}
    assert states[3] == "MODEL_STATE_READY", states


# --- 6. SIGTERM under load ----------------------------------------------------------------------


async def test_sigterm_under_load_drains_every_worker_and_exits_zero(
    start_server: ServerFactory, workers_repository: Path
) -> None:
    """8 callers on connections of their own (some sending large cnn batches, through shared
    memory) loop until their first UNAVAILABLE; SIGTERM to the supervisor after a second of
    load. Every call ends OK or UNAVAILABLE (but for gRPC's rare CANCELLED of a call in
    transit), every process is gone and the server exits 0 within its grace period."""
    grace = 10.0
    server = start_workers(
        start_server, workers_repository, env={"INFERD_GRACE_PERIOD_S": str(grace)}
    )
    children = [*frontend_pids(server), *engine_pids(server)]
    rng = np.random.default_rng(7)
    oks: list[int] = []

    async def caller(i: int) -> list[str]:
        model, x = ("cnn", cnn_input(rng, 8)) if i % 4 == 0 else ("mlp", mlp_input(rng, 2))
        codes: list[str] = []
        async with AsyncInferClient(server.target, options=own_connection(i)) as client:
            for _ in range(2000):
                try:
                    await client.infer(model, x, timeout=WAIT)
                    codes.append("OK")
                    oks.append(1)
                except InferError as exc:
                    codes.append(exc.code.name)
                    if exc.code == UNAVAILABLE:
                        break
        return codes

    callers = [asyncio.create_task(caller(i)) for i in range(8)]
    started = time.monotonic()
    await wait_until(lambda: len(oks) >= 50 and time.monotonic() - started >= 1.0, "load")
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(server.process.wait, grace + 10)
    exit_s = time.monotonic() - signalled
    per_caller = await asyncio.wait_for(asyncio.gather(*callers), WAIT)

    tally = Counter(code for codes in per_caller for code in codes)
    report = (
        f"SIGTERM under load: exit {rc} after {exit_s:.2f} s (grace {grace} s); calls "
        f"{dict(tally)}\n{server.describe()}"
    )
    print("\n" + report.splitlines()[0])
    assert rc == 0, report
    assert exit_s < grace + 2.0, report
    # A call in transit at the instant a frontend's transport stops ends CANCELLED
    # (grpc/grpc#41785, see test_shutdown.py): tolerated, a few. The frontends quiesce on every
    # frontend's refusals (workers/frontend.py `Refusals`); with four processes on two cores a
    # client's retry still lands on a stopping transport in about one run in four (one call).
    # Nothing may end UNKNOWN, INTERNAL or DEADLINE_EXCEEDED.
    assert set(tally) <= {"OK", "UNAVAILABLE", "CANCELLED"}, report
    assert tally["CANCELLED"] <= len(per_caller), report
    assert all(codes[-1] == "UNAVAILABLE" for codes in per_caller), report
    assert SUPERVISOR_STOPPED.search(server.log_text()), report
    assert "signal received: draining 2 frontend(s), then the engine" in server.log_text()
    assert [pid for pid in children if alive(pid)] == [], "workers outlived the supervisor"
    assert shm_entries(server) == [], "shared-memory objects outlived the server"


# --- 7. a frontend dies -------------------------------------------------------------------------


async def test_a_killed_frontend_is_restarted_while_the_other_keeps_serving(
    start_server: ServerFactory, workers_repository: Path
) -> None:
    """10 callers on connections of their own, without retries; SIGKILL to the frontend that
    took the fewest of their requests (so that the other surely holds some connections)."""
    server = start_workers(start_server, workers_repository)
    target = server.target
    load = ChannelLoad(target, 10)
    load.start()
    try:
        await load.each_answered(5, 0.0)
        answered = by_label(
            await scrape_async(server), "inferd_worker_requests_total", "worker_pid"
        )
        first, second = sorted(frontend_pids(server), key=lambda p: answered.get(str(p), 0.0))
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)

        restarted = restart_line(r"frontend \d+", first)
        await wait_until(lambda: restarted.search(server.log_text()) is not None, "restart line")
        await wait_until(lambda: len(frontend_pids(server)) == 3, "a new frontend listening")
        back = time.monotonic()
        new = frontend_pids(server)[-1]

        async def serving() -> bool:
            return await health_of(target) == SERVING

        await wait_until(serving, "health SERVING again")
        # Every caller is answered again, those whose connection died included.
        await load.each_answered(5, time.monotonic())
    finally:
        await load.stop()

    log = server.log_text()
    match = restarted.search(log)
    assert match is not None and match.group(1) == str(-signal.SIGKILL), log[-2000:]
    failures = load.failures()
    failed_callers = {i for i, _, _, _ in failures}
    survivors = [i for i in range(len(load.outcomes)) if i not in failed_callers]
    report = (
        f"frontend {first} killed, {new} listening {back - killed:.2f} s later; calls "
        f"{load.tally()}; callers with a failure {sorted(failed_callers)}; failures "
        f"{[(i, round(t - killed, 2), c) for i, t, c, _ in failures[:10]]}"
    )
    print(f"\n{report}")
    assert {code for _, _, code, _ in failures} <= {"UNAVAILABLE"}, report
    # The killed frontend's connections fail once or twice (what was in flight, a reconnect),
    # the others never; and those kept being answered while the frontend was down.
    assert all(
        sum(1 for i, _, _, _ in failures if i == caller) <= 3 for caller in failed_callers
    ), report
    assert survivors, f"every connection went to the killed frontend (or all failed): {report}"
    for i in survivors:
        assert load.ok_since(i, killed, back) > 0, f"caller {i} not answered meanwhile: {report}"

    samples: list[tuple[str, dict[str, str], float]] = []

    async def counted() -> bool:
        nonlocal samples
        samples = await scrape_async(server)
        return total(samples, "inferd_workers", role="frontend") == WORKERS

    await wait_until(counted, "inferd_workers{role=frontend} back to 2", 5.0)
    assert total(samples, "inferd_worker_restarts_total", role="frontend") == 1
    assert total(samples, "inferd_worker_restarts_total", role="engine") == 0
    assert total(samples, "inferd_workers", role="engine") == 1
    processes = by_label(samples, "inferd_worker_process", "worker_pid", role="frontend")
    assert processes == {str(second): 1.0, str(new): 1.0}, processes
    assert not alive(first)


# --- 8. the engine dies -------------------------------------------------------------------------


async def _forwarded_status(stub: model_status_pb2_grpc.ModelStatusStub) -> tuple[str, float]:
    """A GetModelStatus (forwarded by the frontend to the engine): its code and duration."""
    started = time.monotonic()
    code = await code_of(
        stub.GetModelStatus(
            model_status_pb2.GetModelStatusRequest(model="mlp"), timeout=RPC_TIMEOUT
        )
    )
    return code.name, time.monotonic() - started


async def test_a_killed_engine_is_restarted_and_requests_meanwhile_fail_fast(
    start_server: ServerFactory, workers_repository: Path
) -> None:
    """SIGKILL to the engine under load (4 inference callers, a GetModelStatus caller, a
    health prober, each on connections of their own): calls are refused UNAVAILABLE at once
    while it is away and health says NOT_SERVING; once the new engine holds the models,
    health says SERVING and every kind of call is answered again."""
    server = start_workers(start_server, workers_repository)
    target = server.target
    (engine,) = engine_pids(server)
    load = ChannelLoad(target, 4)
    health_seen: list[tuple[float, int | grpc.StatusCode]] = []
    forwarded: list[tuple[float, str, float]] = []
    stop = asyncio.Event()

    async def watch_health() -> None:
        while not stop.is_set():
            health_seen.append((time.monotonic(), await health_of(target)))
            await asyncio.sleep(0.02)

    async def keep_asking(stubs: list[model_status_pb2_grpc.ModelStatusStub]) -> None:
        while not stop.is_set():
            for stub in stubs:
                code, took = await _forwarded_status(stub)
                forwarded.append((time.monotonic(), code, took))
            await asyncio.sleep(0.05)

    async with channels(target, 4) as opened:
        stubs = [model_status_pb2_grpc.ModelStatusStub(c) for c in opened]
        load.start()
        probes = [
            asyncio.create_task(watch_health()),
            asyncio.create_task(keep_asking(stubs)),
        ]
        try:
            await load.each_answered(5, 0.0)
            killed = time.monotonic()
            os.kill(engine, signal.SIGKILL)

            restarted = restart_line("engine", engine)
            await wait_until(lambda: restarted.search(server.log_text()) is not None, "restart")
            await wait_until(lambda: len(engine_pids(server)) == 2, "a new engine with models")
            new = engine_pids(server)[-1]

            async def serving() -> bool:
                return await health_of(target) == SERVING

            await wait_until(serving, "health SERVING again")
            back = time.monotonic()
            await load.each_answered(5, back)

            async def forwarded_again() -> bool:
                # Over every connection: both frontends forward to the new engine.
                return all(
                    code == "OK"
                    for code, _ in await asyncio.gather(
                        *(_forwarded_status(stub) for stub in stubs)
                    )
                )

            await wait_until(forwarded_again, "GetModelStatus answered over every connection")
            forwarded_back = time.monotonic()
        finally:
            stop.set()
            await load.stop()
            await asyncio.wait_for(asyncio.gather(*probes), WAIT)

    failures = load.failures()
    during = [h for t, h in health_seen if killed <= t <= back]
    forwarded_codes = Counter(code for t, code, _ in forwarded if t >= killed)
    report = (
        f"engine {engine} killed, {new} serving {back - killed:.2f} s later, forwarded RPCs "
        f"answered {forwarded_back - back:.2f} s after that; inference calls {load.tally()}, "
        f"slowest failure {max((f[3] for f in failures), default=0):.3f} s; GetModelStatus "
        f"{dict(forwarded_codes)}, slowest {max(t for _, _, t in forwarded):.3f} s; "
        f"health meanwhile {Counter(str(h) for h in during)}"
    )
    print(f"\n{report}")
    assert failures, f"no call saw the engine gone: {report}"
    assert {code for _, _, code, _ in failures} == {"UNAVAILABLE"}, report
    assert set(forwarded_codes) <= {"OK", "UNAVAILABLE"}, report
    # Refused at once while the engine is away, never held until the call's deadline.
    assert max(took for _, _, _, took in failures) < RPC_TIMEOUT / 4, report
    assert max(took for _, _, took in forwarded) < RPC_TIMEOUT / 4, report
    assert NOT_SERVING in during, report
    after = [h for t, h in health_seen if t > back]
    assert all(h == SERVING for h in after), report

    samples = await scrape_async(server)
    assert total(samples, "inferd_worker_restarts_total", role="engine") == 1
    assert total(samples, "inferd_workers", role="engine") == 1
    assert total(samples, "inferd_workers", role="frontend") == WORKERS
    engines = by_label(samples, "inferd_worker_process", "worker_pid", role="engine")
    assert engines == {str(new): 1.0}, engines
    assert not alive(engine)


async def test_forwarded_rpcs_are_answered_as_soon_as_a_restarted_engine_serves(
    start_server: ServerFactory, workers_repository: Path
) -> None:
    """Callers that asked for ModelStatus while the engine was away (the frontends' channels
    to it failed to connect) ask again once health says SERVING and inference is answered on
    every connection: the forwarded RPCs must be answered too."""
    server = start_workers(start_server, workers_repository)
    target = server.target
    (engine,) = engine_pids(server)
    stop = asyncio.Event()
    x = mlp_input(np.random.default_rng(8), 1)

    async with channels(target, 4) as opened:
        stubs = [model_status_pb2_grpc.ModelStatusStub(c) for c in opened]

        async def keep_asking() -> None:
            while not stop.is_set():
                await asyncio.gather(*(_forwarded_status(stub) for stub in stubs))
                await asyncio.sleep(0.05)

        os.kill(engine, signal.SIGKILL)
        asking = asyncio.create_task(keep_asking())
        try:
            await wait_until(lambda: len(engine_pids(server)) == 2, "a new engine with models")

            async def serving() -> bool:
                if await health_of(target) != SERVING:
                    return False
                codes = [
                    await code_of(
                        predict_pb2_grpc.PredictStub(c).Predict(
                            predict_request("mlp", x), timeout=RPC_TIMEOUT
                        )
                    )
                    for c in opened
                ]
                return codes == [OK] * len(opened)

            await wait_until(serving, "SERVING, and inference answered on every connection")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(asking), WAIT)
        answered = [await _forwarded_status(stub) for stub in stubs]
    assert [code for code, _ in answered] == ["OK"] * len(stubs), answered


# --- 9. forwarded RPCs --------------------------------------------------------------------------


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def test_non_inference_rpcs_are_forwarded_to_the_engine(
    workers_server: ServerProcess,
) -> None:
    server = workers_server
    target = server.target
    watch = LogWatch(server)
    models = {"mlp", "cnn", "echo_bytes", "counted", "mlp_window", "mlp_hold", "spare"}
    async with channels(target, 4) as opened:
        for channel in opened:  # whichever frontend each connection reached
            status = model_status_pb2_grpc.ModelStatusStub(channel)
            metadata = await status.GetModelMetadata(
                model_status_pb2.GetModelMetadataRequest(model="mlp"), timeout=RPC_TIMEOUT
            )
            assert [t.name for t in metadata.inputs] == ["input"], metadata
            listed = await status.ListModels(
                model_status_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT
            )
            assert models <= {m.name for m in listed.models}, listed

            watch_call = status.WatchModelStatus(
                model_status_pb2.WatchModelStatusRequest(model="mlp"), timeout=RPC_TIMEOUT
            )
            first = await asyncio.wait_for(watch_call.read(), RPC_TIMEOUT)
            watch_call.cancel()
            assert (first.model, first.version) == ("mlp", 1), first
            assert first.state == model_status_pb2.MODEL_STATE_READY, first

            oip = oip_grpc.GRPCInferenceServiceStub(channel)
            assert (await oip.ServerReady(oip_pb2.ServerReadyRequest(), timeout=RPC_TIMEOUT)).ready
            ready = await oip.ModelReady(oip_pb2.ModelReadyRequest(name="mlp"), timeout=RPC_TIMEOUT)
            assert ready.ready
            oip_metadata = await oip.ModelMetadata(
                oip_pb2.ModelMetadataRequest(name="mlp"), timeout=RPC_TIMEOUT
            )
            assert [(t.name, t.datatype, list(t.shape)) for t in oip_metadata.inputs] == [
                ("input", "FP32", [-1, 64])
            ], oip_metadata
            assert list(oip_metadata.versions) == ["1"], oip_metadata
            code = await code_of(
                oip.ModelMetadata(oip_pb2.ModelMetadataRequest(name="nope"), timeout=RPC_TIMEOUT)
            )
            assert code == grpc.StatusCode.NOT_FOUND

            # The control plane: the token travels with the forwarded call.
            repository = model_repository_pb2_grpc.ModelRepositoryStub(channel)
            for index, request in (
                (repository.Index, model_repository_pb2.RepositoryIndexRequest()),
                (oip.RepositoryIndex, oip_pb2.RepositoryIndexRequest()),
            ):
                for metadata, expected in (
                    ((), grpc.StatusCode.UNAUTHENTICATED),
                    (bearer("wrong"), grpc.StatusCode.PERMISSION_DENIED),
                    (bearer(TOKEN), OK),
                ):
                    code = await code_of(index(request, metadata=metadata, timeout=RPC_TIMEOUT))
                    assert code == expected, (index, metadata)

        # Unload and Load through one frontend; the other frontend's routing follows.
        repository = model_repository_pb2_grpc.ModelRepositoryStub(opened[0])
        unload = model_repository_pb2.UnloadModelRequest(model="spare")
        assert await code_of(repository.Unload(unload, timeout=RPC_TIMEOUT)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        await repository.Unload(unload, metadata=bearer(TOKEN), timeout=RPC_TIMEOUT)
        x = adder_input(1)
        for channel in opened:
            code = await code_of(
                predict_pb2_grpc.PredictStub(channel).Predict(
                    predict_request("spare", x), timeout=RPC_TIMEOUT
                )
            )
            assert code == grpc.StatusCode.NOT_FOUND
        load = model_repository_pb2.LoadModelRequest(model="spare")
        assert await code_of(repository.Load(load, timeout=RPC_TIMEOUT)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        loaded = await repository.Load(load, metadata=bearer(TOKEN), timeout=WAIT)
        assert [model_status_pb2.ModelState.Name(v.state) for v in loaded.versions][-1] == (
            "MODEL_STATE_READY"
        ), loaded
        for channel in opened:
            response = await predict_pb2_grpc.PredictStub(channel).Predict(
                predict_request("spare", x), timeout=RPC_TIMEOUT
            )
            (tensor,) = response.outputs
            y = from_wire(tensor.datatype, list(tensor.shape), tensor.contents)
            np.testing.assert_array_equal(y, x["x"] + 5)
    watch.assert_clean()
