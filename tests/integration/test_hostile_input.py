"""Hostile clients against a real server: messages built to cost the server memory or time
(20M typed elements, 10M BYTES elements, a stream that is never read, more bytes than the
server's budget, 100k-character names, 5000-digit versions, bytes that are no message, calls
abandoned mid-flight). Each is answered with its exact status, cheaply, without stalling other
callers, and without a traceback or an ERROR line in the server's log.

Memory is the server process's own (/proc/<pid>/status): VmRSS, and VmHWM (its peak, reset
through /proc/<pid>/clear_refs before a measurement).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from integration_support import (
    LogWatch,
    ServerFactory,
    ServerProcess,
    add_summary_line,
    cnn_input,
    mlp_input,
    predict_request,
    raw_tensor,
)

from inferd.demo_models import build_demo_repository, build_echo_bytes, write_model
from inferd_wire.codec import from_wire, to_wire
from inferd_wire.proto.inferd.v1 import model_status_pb2, predict_pb2
from inferd_wire.proto.inference import grpc_service_pb2 as oip

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

PREDICT = "/inferd.v1.Predict/Predict"
PREDICT_STREAM = "/inferd.v1.Predict/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

MB = 1024 * 1024
BIG_MESSAGES = [
    ("grpc.max_send_message_length", 64 * MB),
    ("grpc.max_receive_message_length", 64 * MB),
]
RPC_TIMEOUT = 30.0
MAX_MESSAGE = 1100  # status messages are clipped to 1024 characters (api/status.py)
STREAM_WINDOW = 256  # the server's default stream_window
BYTES_CAP = 1 << 20  # the server's default max_bytes_elements_per_request

# echo_bytes batches (max_batch_size 32), so a request of 10M elements is refused by its batch
# dimension before the BYTES cap is reached; echo_unbatched is the same graph served whole
# (max_batch_size = 0), so only the cap stands between 10M elements and their decoding.
ECHO_UNBATCHED = "echo_unbatched"


# --- what the tests read from the server ---------------------------------------------------------


def proc_status(server: ServerProcess, key: str) -> int:
    """A /proc/<pid>/status figure of the server process, in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{server.process.pid}/status")


def reset_peak(server: ServerProcess) -> None:
    """VmHWM starts again from the current RSS (proc(5), clear_refs: 5)."""
    with open(f"/proc/{server.process.pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def metrics_text(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    return text


def metric(server: ServerProcess, name: str) -> float | None:
    """The sum of every series of `name` on /metrics, None when it has none."""
    values = [
        float(m.group(1))
        for m in re.finditer(
            rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", metrics_text(server), re.M
        )
    ]
    return sum(values) if values else None


def bytes_in_flight(server: ServerProcess) -> float:
    value = metric(server, "inferd_request_bytes_in_flight")
    assert value is not None, "no inferd_request_bytes_in_flight on /metrics"
    return value


def wait_for_bytes_in_flight(server: ServerProcess, value: float, timeout: float = 3.0) -> float:
    """Polls inferd_request_bytes_in_flight until it is `value` (or `timeout` s); the last."""
    deadline = time.monotonic() + timeout
    held = bytes_in_flight(server)
    while held != value and time.monotonic() < deadline:
        time.sleep(0.05)
        held = bytes_in_flight(server)
    return held


def assert_serving(server: ServerProcess) -> None:
    assert server.process.poll() is None, server.describe()
    with grpc.insecure_channel(server.target) as channel:
        answer = channel.unary_unary(HEALTH_CHECK)(
            health_pb2.HealthCheckRequest().SerializeToString(), timeout=RPC_TIMEOUT
        )
    status = health_pb2.HealthCheckResponse.FromString(answer).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# --- raw calls -----------------------------------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    elapsed: float
    response: bytes = b""


def call_raw(channel: grpc.Channel, method: str, request: bytes, timeout: float = RPC_TIMEOUT):
    started = time.perf_counter()
    try:
        response = channel.unary_unary(method)(request, timeout=timeout)
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "", time.perf_counter() - started)
    return Answer(OK, "", time.perf_counter() - started, response)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def typed_int64_zeros(model: str, name: str, shape: list[int], count: int) -> bytes:
    """A ModelInferRequest whose one INT64 input holds `count` zeros in contents.int64_contents:
    packed, one byte each on the wire, eight once parsed. Built by hand: the client library
    would take seconds to build it element by element."""
    tensor = oip.ModelInferRequest.InferInputTensor(name=name, datatype="INT64", shape=shape)
    contents = length_delimited(3, bytes(count))  # InferTensorContents.int64_contents
    tensor_bytes = tensor.SerializeToString() + length_delimited(5, contents)  # .contents
    return oip.ModelInferRequest(model_name=model).SerializeToString() + length_delimited(
        5, tensor_bytes
    )  # ModelInferRequest.inputs


def oip_raw_request(model: str, inputs: dict[str, np.ndarray], **fields: object) -> bytes:
    request = oip.ModelInferRequest(model_name=model, **fields)
    for name, array in inputs.items():
        datatype, shape, contents = to_wire(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(contents)
    return request.SerializeToString()


def bytes_elements(count: int, element: bytes) -> bytes:
    return (struct.pack("<I", len(element)) + element) * count


# --- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("hostile_repository")
    build_demo_repository(repository)
    write_model(build_echo_bytes(), repository, ECHO_UNBATCHED, config_toml="max_batch_size = 0\n")
    return repository


@pytest.fixture(scope="module")
def hostile_server(module_server_factory: ServerFactory, hostile_repository: Path) -> ServerProcess:
    return module_server_factory(hostile_repository)


@pytest.fixture(scope="module")
def memory_server(module_server_factory: ServerFactory, hostile_repository: Path) -> ServerProcess:
    """A server of its own for the memory figures, which other tests' requests would blur."""
    return module_server_factory(hostile_repository)


@pytest.fixture
def big_channel(hostile_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(hostile_server.target, options=BIG_MESSAGES) as channel:
        yield channel


# --- 20M typed elements --------------------------------------------------------------------------

TYPED_ELEMENTS = 20_000_000


def test_typed_contents_for_a_missing_model_are_not_found_fast_and_cheaply(
    memory_server: ServerProcess, request: pytest.FixtureRequest
):
    """~20 MB on the wire that a server converting typed contents before looking the model up
    would turn into 160 MB of int64 (and more as Python ints): NOT_FOUND within a second, and
    the server holds no more than 200 MB more afterwards."""
    watch = LogWatch(memory_server)
    raw = typed_int64_zeros("no_such_model", "x", [TYPED_ELEMENTS], TYPED_ELEMENTS)
    with grpc.insecure_channel(memory_server.target, options=BIG_MESSAGES) as channel:
        assert call_raw(channel, HEALTH_CHECK, b"").code == OK  # connected before timing
        reset_peak(memory_server)
        before = proc_status(memory_server, "VmRSS")
        answer = call_raw(channel, MODEL_INFER, raw)
        time.sleep(0.2)  # the handler's last references go when its call ends
        grown = proc_status(memory_server, "VmRSS") - before
        peak = proc_status(memory_server, "VmHWM") - before
    figures = (
        f"{len(raw) / MB:.0f} MB typed request for a missing model: {answer.elapsed:.3f} s, "
        f"server RSS {grown / MB:+.0f} MB after, peak {peak / MB:+.0f} MB"
    )
    add_summary_line(request.config, figures)
    assert answer.code == NOT_FOUND, (answer.code, answer.details)
    assert "'no_such_model'" in answer.details
    # Before: 2 s and +1.4 GB kept, the contents converted before the model was looked up.
    # The parse alone takes ~0.4 s here; a loose bound keeps a busy machine from failing it.
    assert answer.elapsed < SLOW, figures
    assert grown < 200 * MB, figures
    assert_serving(memory_server)
    watch.assert_clean()


def test_typed_contents_of_the_wrong_shape_are_invalid_argument_fast(
    memory_server: ServerProcess, request: pytest.FixtureRequest
):
    """20M INT64 zeros as a rank-1 input_ids (text_encoder's is [batch, sequence])."""
    watch = LogWatch(memory_server)
    raw = typed_int64_zeros("text_encoder", "input_ids", [TYPED_ELEMENTS], TYPED_ELEMENTS)
    with grpc.insecure_channel(memory_server.target, options=BIG_MESSAGES) as channel:
        assert call_raw(channel, HEALTH_CHECK, b"").code == OK
        answer = call_raw(channel, MODEL_INFER, raw)
    add_summary_line(
        request.config, f"20 MB typed request of the wrong shape: {answer.elapsed:.3f} s"
    )
    assert answer.code == INVALID, (answer.code, answer.details)
    assert "'input_ids'" in answer.details and "rank 1" in answer.details, answer.details
    assert answer.elapsed < SLOW
    assert_serving(memory_server)
    watch.assert_clean()


# --- BYTES elements ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "mentions"),
    [
        (ECHO_UNBATCHED, (f"{10_000_000} BYTES elements", f"limit of {BYTES_CAP}")),
        ("echo_bytes", ("batch dimension 10000000", "max_batch_size 32")),
    ],
)
def test_ten_million_bytes_elements_are_refused_before_any_is_decoded(
    hostile_server: ServerProcess, big_channel: grpc.Channel, model: str, mentions: tuple[str, ...]
):
    watch = LogWatch(hostile_server)
    count = 10_000_000
    message = predict_pb2.PredictRequest(
        model=model, inputs=[raw_tensor("text", "BYTES", [count], bytes_elements(count, b""))]
    )
    answer = call_raw(big_channel, PREDICT, message.SerializeToString())
    assert answer.code == INVALID, (answer.code, answer.details)
    for word in mentions:
        assert word in answer.details, answer.details
    assert answer.elapsed < 1.0
    assert_serving(hostile_server)
    watch.assert_clean()


class HealthProbe:
    """grpc.health.v1 Check every 20 ms on a channel of its own, in a thread; the latencies."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = health_pb2.HealthCheckRequest().SerializeToString()
        with grpc.insecure_channel(self._target) as channel:
            check = channel.unary_unary(HEALTH_CHECK)
            check(request, timeout=RPC_TIMEOUT)  # connected before measuring
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    check(request, timeout=5)
                except grpc.RpcError as error:
                    self.errors.append(f"{error.code().name}: {error.details()}")
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# The event loop answers health checks, so one that takes long is a loop that was held. A
# request's BYTES elements decode on a worker thread (api/inference.py, HEAVY_ELEMENTS). On the
# two-core development box a check alone takes ~1 ms but the slowest of ~20 taken while 200k
# elements are echoed measured 90-160 ms over runs, so the limit is 250 ms rather than 100.
HEALTH_LATENCY_LIMIT = 0.25
# The slowest health check may take this share of the longest request it ran beside.
HEALTH_SHARE = 0.3
# Bound on a refusal that should be fast, loose enough for a machine busy with other work.
SLOW = 3.0


@pytest.mark.parametrize(
    ("count", "repeats"), [(200_000, 3), (BYTES_CAP, 1)], ids=["200k", "at-the-cap"]
)
def test_bytes_elements_under_the_cap_never_stall_health_checks(
    hostile_server: ServerProcess,
    big_channel: grpc.Channel,
    request: pytest.FixtureRequest,
    count: int,
    repeats: int,
):
    """Short BYTES elements, up to the cap (1M), echoed whole or refused with a status naming
    the limit, while health checks every 20 ms stay quick. A few one-element requests first,
    so that the model has a measured run time (the server runs short batches inline)."""
    watch = LogWatch(hostile_server)
    texts = [f"w{i % 100_000:05d}".encode() for i in range(count)]
    contents = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    message = predict_pb2.PredictRequest(
        model=ECHO_UNBATCHED, inputs=[raw_tensor("text", "BYTES", [count], contents)]
    ).SerializeToString()
    one = predict_pb2.PredictRequest(
        model=ECHO_UNBATCHED, inputs=[raw_tensor("text", "BYTES", [1], bytes_elements(1, b"a"))]
    ).SerializeToString()
    for _ in range(5):
        assert call_raw(big_channel, PREDICT, one).code == OK
    with HealthProbe(hostile_server.target) as probe:
        answers = [call_raw(big_channel, PREDICT, message) for _ in range(repeats)]
    worst = max(probe.latencies)
    add_summary_line(
        request.config,
        f"{count} BYTES elements: {[round(a.elapsed, 3) for a in answers]} s; health checks "
        f"meanwhile: {len(probe.latencies)}, slowest {worst * 1000:.1f} ms",
    )
    for answer in answers:
        if answer.code == OK:
            (tensor,) = predict_pb2.PredictResponse.FromString(answer.response).outputs
            echoed = from_wire(tensor.datatype, tensor.shape, tensor.contents)
            assert list(echoed) == texts
        else:
            assert answer.code in (INVALID, EXHAUSTED), (answer.code, answer.details)
            assert "limit" in answer.details or "budget" in answer.details, answer.details
    assert not probe.errors, probe.errors
    assert len(probe.latencies) >= 5
    # Relative to the request's own time, so that a busy machine slowing both does not fail
    # it: before, the reply was encoded on the event loop and health waited ~80% of it.
    longest = max(a.elapsed for a in answers)
    assert worst < max(HEALTH_LATENCY_LIMIT, HEALTH_SHARE * longest), (
        f"a health check took {worst * 1000:.0f} ms, beside a request of {longest * 1000:.0f} ms"
    )
    watch.assert_clean()


# --- a stream that is never read -----------------------------------------------------------------


def _stream_request(method: str) -> bytes:
    """A 16 kB request (mlp, 64 rows) of `method`'s protocol."""
    inputs = mlp_input(np.random.default_rng(4), 64)
    if method == PREDICT_STREAM:
        return predict_request("mlp", inputs).SerializeToString()
    return oip_raw_request("mlp", inputs)


class Writer:
    """Writes one request again and again on a stream and reads nothing; `timeline` samples
    the writes completed every 0.1 s."""

    def __init__(self, call: grpc.aio.StreamStreamCall, raw: bytes) -> None:
        self._call = call
        self._raw = raw
        self._stop = False
        self.writes = 0
        self.timeline: list[int] = []
        self._task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while not self._stop:
            await self._call.write(self._raw)
            self.writes += 1

    async def run(self, seconds: float, settle: float | None = None) -> None:
        """Go on for `seconds`; with `settle`, stop early once no write has completed for
        that long."""
        for tick in range(round(seconds * 10)):
            await asyncio.sleep(0.1)
            self.timeline.append(self.writes)
            if settle is not None and tick > settle * 10:
                if self.timeline[-1] == self.timeline[-1 - round(settle * 10)]:
                    return

    async def finish(self) -> None:
        """Stop after the write in progress (which completes once the answers are read)."""
        self._stop = True
        await self._task

    async def abandon(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_a_stream_whose_client_never_reads_holds_at_most_its_window(
    hostile_server: ServerProcess, request: pytest.FixtureRequest
):
    """A PredictStream client writes 16 kB requests for 5 s and reads nothing: the server
    takes at most stream_window of them (+1, read and waiting for a slot), gRPC's flow control
    then stops the writer, and the server's memory stays put. Once the client reads, every
    request it wrote is answered, once, and the stream ends OK."""
    watch = LogWatch(hostile_server)
    raw = _stream_request(PREDICT_STREAM)
    reset_peak(hostile_server)
    before = proc_status(hostile_server, "VmRSS")
    async with grpc.aio.insecure_channel(hostile_server.target) as channel:
        call = channel.stream_stream(PREDICT_STREAM)(timeout=60)
        writer = Writer(call, raw)
        await writer.run(seconds=5.0)
        held = await asyncio.to_thread(bytes_in_flight, hostile_server)
        grown = proc_status(hostile_server, "VmRSS") - before
        peak = proc_status(hostile_server, "VmHWM") - before

        async def read_all() -> list[predict_pb2.PredictStreamResponse]:
            return [predict_pb2.PredictStreamResponse.FromString(a) async for a in call]

        reader = asyncio.get_running_loop().create_task(read_all())
        await writer.finish()
        await call.done_writing()
        answers = await reader
        code = await call.code()
    add_summary_line(
        request.config,
        f"never-read PredictStream: {writer.timeline[-1]} writes of {len(raw)} B in 5 s, "
        f"server holds {held / len(raw):.0f} requests, RSS {grown / MB:+.0f} MB (peak "
        f"{peak / MB:+.0f} MB)",
    )
    stalled = writer.timeline[-1]
    assert writer.timeline[-20] == stalled, f"writes never stopped: {writer.timeline}"
    assert stalled < 10_000, writer.timeline
    assert held <= (STREAM_WINDOW + 1) * len(raw), f"{held / len(raw):.0f} requests held"
    assert grown < 300 * MB and peak < 300 * MB, (grown, peak)
    assert code == OK
    assert len(answers) == writer.writes
    assert all(a.WhichOneof("result") == "response" for a in answers)
    await asyncio.to_thread(assert_serving, hostile_server)
    watch.assert_clean()


@pytest.mark.parametrize("method", [PREDICT_STREAM, MODEL_STREAM_INFER])
@pytest.mark.parametrize("when", ["stalled at the window", "just after writing"])
async def test_a_client_that_cancels_a_stream_leaves_nothing_behind(
    hostile_server: ServerProcess, method: str, when: str
):
    """A stream's requests are charged to the server's byte budget when read: once its client
    has cancelled, every charge is refunded (else the budget shrinks for good, stream after
    stream, until every large request is refused), and the server logs no error for a caller
    that left."""
    watch = LogWatch(hostile_server)
    raw = _stream_request(method)
    baseline = await asyncio.to_thread(bytes_in_flight, hostile_server)
    async with grpc.aio.insecure_channel(hostile_server.target) as channel:
        call = channel.stream_stream(method)(timeout=60)
        if when == "stalled at the window":
            writer = Writer(call, raw)
            await writer.run(seconds=8.0, settle=0.5)
            await writer.abandon()
            assert writer.writes > STREAM_WINDOW, writer.timeline
        else:
            for _ in range(40):
                await call.write(raw)
            await asyncio.sleep(0.005)
        call.cancel()
    held = await asyncio.to_thread(wait_for_bytes_in_flight, hostile_server, baseline)
    await asyncio.to_thread(assert_serving, hostile_server)
    problems = []
    if held != baseline:
        problems.append(
            f"{held - baseline:.0f} bytes ({(held - baseline) / len(raw):.2f} requests of "
            f"{len(raw)} B) still charged to the byte budget 3 s after the client cancelled"
        )
    try:
        watch.assert_clean()
    except AssertionError as error:
        problems.append(str(error))
    assert not problems, "\n".join(problems)


# --- the byte budget -----------------------------------------------------------------------------

BUDGET = 4_000_000  # two 1.5 MB cnn requests fit, a third does not


@pytest.fixture(scope="module")
def budget_server(module_server_factory: ServerFactory, hostile_repository: Path) -> ServerProcess:
    return module_server_factory(
        hostile_repository, env={"INFERD_MAX_REQUEST_BYTES_IN_FLIGHT": str(BUDGET)}
    )


def _cnn_32_rows() -> bytes:
    inputs = cnn_input(np.random.default_rng(5), 32)
    return predict_request("cnn", inputs).SerializeToString()  # 1.5 MB


async def test_requests_past_the_byte_budget_are_refused_and_the_budget_comes_back(
    budget_server: ServerProcess,
):
    """Eight 1.5 MB requests at once against a 4 MB budget: the ones that do not fit are
    RESOURCE_EXHAUSTED naming max_request_bytes_in_flight, the others are served; afterwards
    nothing is held and every refusal was counted."""
    watch = LogWatch(budget_server)
    raw = _cnn_32_rows()
    refusals_before = metric(budget_server, "inferd_request_bytes_refusals_total") or 0.0
    async with grpc.aio.insecure_channel(budget_server.target, options=BIG_MESSAGES) as channel:
        predict = channel.unary_unary(PREDICT)

        async def one() -> tuple[grpc.StatusCode, str, bytes]:
            try:
                return OK, "", await predict(raw, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details() or "", b""

        outcomes = await asyncio.gather(*(one() for _ in range(8)))
    codes = [code for code, _, _ in outcomes]
    assert set(codes) <= {OK, EXHAUSTED}, [(c, d) for c, d, _ in outcomes]
    assert OK in codes and EXHAUSTED in codes, codes
    for code, details, response in outcomes:
        if code == EXHAUSTED:
            assert "max_request_bytes_in_flight" in details, details
        else:
            (tensor,) = predict_pb2.PredictResponse.FromString(response).outputs
            assert list(tensor.shape) == [32, 100]
    held = await asyncio.to_thread(wait_for_bytes_in_flight, budget_server, 0.0)
    assert held == 0
    refusals = metric(budget_server, "inferd_request_bytes_refusals_total")
    assert refusals is not None and refusals - refusals_before == codes.count(EXHAUSTED) > 0
    watch.assert_clean()


async def test_stream_messages_past_the_byte_budget_are_refused_in_the_stream(
    budget_server: ServerProcess,
):
    """Six 1.5 MB messages on one PredictStream against a 4 MB budget: those that arrive while
    the budget is spent are answered RESOURCE_EXHAUSTED in the stream (with an empty id: they
    were never parsed), the rest are served, every message gets one answer."""
    watch = LogWatch(budget_server)
    messages = []
    for i in range(6):
        message = predict_pb2.PredictRequest.FromString(_cnn_32_rows())
        message.id = str(i)
        messages.append(message.SerializeToString())
    async with grpc.aio.insecure_channel(budget_server.target, options=BIG_MESSAGES) as channel:
        call = channel.stream_stream(PREDICT_STREAM)(iter(messages), timeout=RPC_TIMEOUT)
        answers = [predict_pb2.PredictStreamResponse.FromString(a) async for a in call]
        assert await call.code() == OK
    assert len(answers) == len(messages)
    served = sorted(a.id for a in answers if a.WhichOneof("result") == "response")
    refused = [a for a in answers if a.WhichOneof("result") == "error"]
    assert served and len(served) + len(refused) == len(messages)
    for answer in refused:
        assert answer.error.code == EXHAUSTED.value[0] and answer.id == "", answer
        assert "max_request_bytes_in_flight" in answer.error.message
    held = await asyncio.to_thread(wait_for_bytes_in_flight, budget_server, 0.0)
    assert held == 0
    watch.assert_clean()


# --- 100k-character names ------------------------------------------------------------------------

LONG = 100_000


def _long_name_cases() -> dict[str, tuple[str, bytes, set[grpc.StatusCode]]]:
    rng = np.random.default_rng(6)
    x = mlp_input(rng, 1)
    long_model = predict_request("m" * LONG, x)
    long_input = predict_request("mlp", {"i" * LONG: x["input"]})
    long_output = predict_request("mlp", x, outputs=["o" * LONG])
    long_datatype = predict_request("mlp", x)
    long_datatype.inputs[0].datatype = "D" * LONG
    oip_long_input = oip.ModelInferRequest.FromString(oip_raw_request("mlp", x))
    oip_long_input.inputs[0].name = "i" * LONG
    found_or_invalid = {NOT_FOUND, INVALID}
    return {
        "Predict model": (PREDICT, long_model.SerializeToString(), found_or_invalid),
        "Predict input": (PREDICT, long_input.SerializeToString(), {INVALID}),
        "Predict output": (PREDICT, long_output.SerializeToString(), {INVALID}),
        "Predict datatype": (PREDICT, long_datatype.SerializeToString(), {INVALID}),
        "ModelInfer model": (
            MODEL_INFER,
            oip_raw_request("m" * LONG, x),
            found_or_invalid,
        ),
        "ModelInfer input": (MODEL_INFER, oip_long_input.SerializeToString(), {INVALID}),
        "ModelInfer output": (
            MODEL_INFER,
            oip_raw_request("mlp", x, outputs=[{"name": "o" * LONG}]),
            {INVALID},
        ),
        "GetModelStatus": (
            "/inferd.v1.ModelStatus/GetModelStatus",
            model_status_pb2.GetModelStatusRequest(model="m" * LONG).SerializeToString(),
            found_or_invalid,
        ),
        "ModelMetadata": (
            "/inference.GRPCInferenceService/ModelMetadata",
            oip.ModelMetadataRequest(name="m" * LONG).SerializeToString(),
            found_or_invalid,
        ),
        "Health Check": (
            HEALTH_CHECK,
            health_pb2.HealthCheckRequest(service="s" * LONG).SerializeToString(),
            {NOT_FOUND},
        ),
    }


LONG_NAME_CASES = _long_name_cases()


@pytest.mark.parametrize("case", list(LONG_NAME_CASES))
def test_a_100k_character_name_is_refused_with_a_short_message(
    hostile_server: ServerProcess, big_channel: grpc.Channel, case: str
):
    watch = LogWatch(hostile_server)
    method, raw, codes = LONG_NAME_CASES[case]
    answer = call_raw(big_channel, method, raw)
    assert answer.code in codes, (answer.code, answer.details[:300])
    assert len(answer.details) < MAX_MESSAGE, len(answer.details)
    watch.assert_clean()


# --- 5000-digit versions -------------------------------------------------------------------------

HUGE_VERSION = "9" * 5000


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (MODEL_INFER, None),
        ("/inference.GRPCInferenceService/ModelReady", oip.ModelReadyRequest),
        ("/inference.GRPCInferenceService/ModelMetadata", oip.ModelMetadataRequest),
        ("/inference.GRPCInferenceService/ModelConfig", oip.ModelConfigRequest),
        ("/inference.GRPCInferenceService/ModelStatistics", oip.ModelStatisticsRequest),
    ],
    ids=lambda v: v.rpartition("/")[2] if isinstance(v, str) else "",
)
def test_a_5000_digit_version_is_invalid_argument(
    hostile_server: ServerProcess, big_channel: grpc.Channel, method: str, message: type | None
):
    watch = LogWatch(hostile_server)
    if message is None:
        x = mlp_input(np.random.default_rng(7), 1)
        raw = oip_raw_request("mlp", x, model_version=HUGE_VERSION)
    else:
        raw = message(name="mlp", version=HUGE_VERSION).SerializeToString()
    answer = call_raw(big_channel, method, raw)
    assert answer.code == INVALID, (answer.code, answer.details[:300])
    assert "not a version number" in answer.details, answer.details[:300]
    assert len(answer.details) < MAX_MESSAGE
    watch.assert_clean()


def test_a_5000_digit_version_in_a_stream_is_answered_there_and_the_stream_goes_on(
    hostile_server: ServerProcess, big_channel: grpc.Channel
):
    watch = LogWatch(hostile_server)
    x = mlp_input(np.random.default_rng(8), 1)
    sent = [
        oip_raw_request("mlp", x, id="before"),
        oip_raw_request("mlp", x, id="bad", model_version=HUGE_VERSION),
        oip_raw_request("mlp", x, id="after"),
    ]
    call = big_channel.stream_stream(MODEL_STREAM_INFER)(iter(sent), timeout=RPC_TIMEOUT)
    answers = {}
    for raw in call:
        answer = oip.ModelStreamInferResponse.FromString(raw)
        answers[answer.infer_response.id] = answer
    assert call.code() == OK
    assert sorted(answers) == ["after", "bad", "before"]
    assert "not a version number" in answers["bad"].error_message
    assert len(answers["bad"].error_message) < MAX_MESSAGE
    for good in ("before", "after"):
        assert not answers[good].error_message, answers[good].error_message
        assert [o.name for o in answers[good].infer_response.outputs] == ["probabilities"]
    watch.assert_clean()


# --- bytes that are no message -------------------------------------------------------------------

UNDECODABLE = (
    b"\xff\xff\xff\xff\xff",  # a tag whose varint never ends
    b"\x0a\xff\xff\xff\x0f",  # field 1, a length far past the end
    b"\x0f",  # wire type 7
    b"\x0b\x10\x01",  # a group that is never closed
)


@pytest.mark.parametrize(
    "method",
    [
        PREDICT,
        MODEL_INFER,
        HEALTH_CHECK,
        "/inferd.v1.ModelStatus/GetModelStatus",
        "/inference.GRPCInferenceService/ModelReady",
    ],
    ids=lambda m: m.rpartition("/")[2],
)
def test_undecodable_bytes_are_invalid_argument(
    hostile_server: ServerProcess, big_channel: grpc.Channel, method: str
):
    watch = LogWatch(hostile_server)
    for raw in UNDECODABLE:
        answer = call_raw(big_channel, method, raw)
        assert answer.code == INVALID, (raw, answer.code, answer.details)
        assert "could not be parsed" in answer.details, answer.details
    assert_serving(hostile_server)
    watch.assert_clean()


def test_undecodable_bytes_in_a_predict_stream_get_an_error_answer_with_no_id(
    hostile_server: ServerProcess, big_channel: grpc.Channel
):
    watch = LogWatch(hostile_server)
    x = mlp_input(np.random.default_rng(9), 1)
    sent = [predict_request("mlp", x, id="before").SerializeToString()]
    sent += UNDECODABLE
    sent.append(predict_request("mlp", x, id="after").SerializeToString())
    call = big_channel.stream_stream(PREDICT_STREAM)(iter(sent), timeout=RPC_TIMEOUT)
    answers = [predict_pb2.PredictStreamResponse.FromString(raw) for raw in call]
    assert call.code() == OK
    assert len(answers) == len(sent)
    served = sorted(a.id for a in answers if a.WhichOneof("result") == "response")
    assert served == ["after", "before"]
    errors = [a for a in answers if a.WhichOneof("result") == "error"]
    assert len(errors) == len(UNDECODABLE)
    for answer in errors:
        assert answer.id == "" and answer.error.code == INVALID.value[0], answer
        assert "could not be parsed" in answer.error.message
    watch.assert_clean()


def test_undecodable_bytes_in_a_model_stream_infer_get_an_error_message(
    hostile_server: ServerProcess, big_channel: grpc.Channel
):
    watch = LogWatch(hostile_server)
    x = mlp_input(np.random.default_rng(10), 1)
    sent = [oip_raw_request("mlp", x, id="before"), *UNDECODABLE]
    sent.append(oip_raw_request("mlp", x, id="after"))
    call = big_channel.stream_stream(MODEL_STREAM_INFER)(iter(sent), timeout=RPC_TIMEOUT)
    answers = [oip.ModelStreamInferResponse.FromString(raw) for raw in call]
    assert call.code() == OK
    assert len(answers) == len(sent)
    served = sorted(a.infer_response.id for a in answers if not a.error_message)
    assert served == ["after", "before"]
    errors = [a.error_message for a in answers if a.error_message]
    assert len(errors) == len(UNDECODABLE)
    assert all("could not be parsed" in e for e in errors), errors
    watch.assert_clean()


# --- callers that leave --------------------------------------------------------------------------


async def test_callers_that_leave_mid_flight_leave_no_error_in_the_log(
    hostile_server: ServerProcess, request: pytest.FixtureRequest
):
    """240 cnn requests whose callers leave after 1 to 5 ms (half by deadline, half by
    cancelling): nothing logged at ERROR, nothing left charged to the byte budget, the
    unanswered-errors counter on /metrics, and the server goes on serving."""
    watch = LogWatch(hostile_server)
    raw = predict_request("cnn", cnn_input(np.random.default_rng(11), 4)).SerializeToString()
    baseline = await asyncio.to_thread(bytes_in_flight, hostile_server)
    rng = np.random.default_rng(12)
    outcomes: list[tuple[grpc.StatusCode, str]] = []

    async with grpc.aio.insecure_channel(hostile_server.target) as channel:
        predict = channel.unary_unary(PREDICT)

        async def by_deadline() -> None:
            try:
                await predict(raw, timeout=float(rng.uniform(0.001, 0.005)))
                outcomes.append((OK, ""))
            except grpc.aio.AioRpcError as error:
                outcomes.append((error.code(), error.details() or ""))

        async def by_cancel() -> None:
            call = predict(raw, timeout=RPC_TIMEOUT)
            await asyncio.sleep(float(rng.uniform(0.001, 0.005)))
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await call

        for _ in range(6):
            await asyncio.gather(
                *(by_deadline() for _ in range(20)), *(by_cancel() for _ in range(20))
            )
        ok = await predict(raw, timeout=RPC_TIMEOUT)
        assert len(predict_pb2.PredictResponse.FromString(ok).outputs) == 1

    await asyncio.sleep(0.5)  # handlers of abandoned calls finish
    held = await asyncio.to_thread(wait_for_bytes_in_flight, hostile_server, baseline)
    unanswered = await asyncio.to_thread(metric, hostile_server, "inferd_unanswered_errors_total")
    codes = Counter(code.name for code, _ in outcomes)
    add_summary_line(
        request.config, f"abandoned calls: deadline outcomes {dict(codes)}, unanswered {unanswered}"
    )
    assert unanswered is not None and unanswered >= 0
    for code, details in outcomes:
        # RESOURCE_EXHAUSTED: shed at once because the work queued ahead would outlast the
        # request's deadline (core/batching/batcher.py).
        shed = code == EXHAUSTED and "deadline" in details
        assert code in (OK, grpc.StatusCode.DEADLINE_EXCEEDED) or shed, (code, details)
    assert held == baseline, f"{held - baseline:.0f} bytes still charged"
    await asyncio.to_thread(assert_serving, hostile_server)
    watch.assert_clean()
