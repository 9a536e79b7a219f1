"""Observability of an in-process server over real gRPC and the real demo models: Prometheus
metrics (checked against the core's own ModelStatus statistics), the /metrics endpoint,
OpenTelemetry traces (server, queue, encode and batch spans, parent-based sampling), JSON logs
with trace ids, the access log, and the NVML GPU gauges (with a fake NVML).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from inferd.app import InferenceServer
from inferd.config import ServerConfig
from inferd.core.models.config import EffectiveConfig
from inferd.core.models.registry import ModelSession, onnxruntime_session
from inferd.core.observer import BatchReport, RejectReason, RepositoryProblem
from inferd.core.types import ModelState
from inferd.demo_models import MLP_CONFIG, build_cnn, build_demo_repository, build_mlp, write_model
from inferd.observability.gpu import GpuCollector
from inferd.observability.logging import ACCESS_LOGGER, TraceIdFilter, configure_logging
from inferd.observability.metrics import PrometheusObserver
from inferd_client import AsyncInferClient, InferError, StreamRequest

PREDICT_SPAN = "/inferd.v1.Predict/Predict"
# A CNN that can hold one request in its queue and runs one row at a time: easy to flood.
FLOOD_CNN_CONFIG = "max_batch_size = 1\nmax_queue_size = 1\ninstances = 1\nmax_queue_delay_us = 0\n"
# One execution slot: with a gated executor, whatever queues while the first batch is held
# executes next as one batch.
GATED_MLP_CONFIG = (
    "max_batch_size = 64\nmax_queue_delay_us = 0\nmax_queue_size = 64\ninstances = 1\n"
)
WAIT_LIMIT = 20.0


# --- helpers ------------------------------------------------------------------------------------


def mlp_input(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.standard_normal((rows, 64)).astype(np.float32)}


def cnn_input(rows: int = 1) -> dict[str, np.ndarray]:
    return {"image": np.zeros((rows, 3, 64, 64), np.float32)}


def config(repository: Path, **settings: Any) -> ServerConfig:
    settings.setdefault("metrics_port", -1)
    return ServerConfig.load(None, model_repository=repository, port=0, **settings)


@contextlib.asynccontextmanager
async def serving(server: InferenceServer) -> AsyncIterator[InferenceServer]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop(1)


def sample_total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def samples(registry: CollectorRegistry, name: str) -> list[Any]:
    return [s for f in registry.collect() for s in f.samples if s.name == name]


async def code_of(call: Any) -> str:
    try:
        await call
    except InferError as exc:
        return exc.code.name
    return "OK"


async def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_LIMIT} s waiting for {what}")
        await asyncio.sleep(0.01)


class Gate:
    """Holds every batch while closed; open (warm-up included) until close() is called."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def wait(self) -> None:
        await self._open.wait()


class GatedSession:
    """A real ONNX Runtime session whose batches wait for `gate` before they execute."""

    def __init__(self, inner: ModelSession, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run_inline(self, batch: Any, outputs: Any) -> None:
        return None  # every batch goes through execute()

    async def execute(self, batch: Sequence[Mapping[str, Any]], outputs: Sequence[str]) -> Any:
        await self._gate.wait()
        return await self._inner.execute(batch, outputs)


def gated_factory(gate: Gate) -> Any:
    def factory(path: Path, effective: EffectiveConfig, name: str) -> Any:
        return GatedSession(onnxruntime_session(path, effective, name), gate)

    return factory


def traced_server(
    repository: Path, exporter: InMemorySpanExporter, **settings: Any
) -> InferenceServer:
    return InferenceServer(
        config(repository, **settings), span_processor=SimpleSpanProcessor(exporter)
    )


def client_tracer() -> tuple[Any, InMemorySpanExporter]:
    """A caller-side tracer (not the global provider): the client injects `traceparent` from
    the current OpenTelemetry context, whichever provider made the span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test-caller"), exporter


def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def children_of(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("demo")
    build_demo_repository(repository)
    return repository


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("mlp")
    write_model(build_mlp(), repository, "mlp", config_toml=MLP_CONFIG)
    return repository


@pytest.fixture(scope="module")
def gated_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("gated")
    write_model(build_mlp(), repository, "mlp", config_toml=GATED_MLP_CONFIG)
    return repository


@pytest.fixture(scope="module")
def flood_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("flood")
    write_model(build_cnn(), repository, "cnn", config_toml=FLOOD_CNN_CONFIG)
    return repository


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging() replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    grpc_level = logging.getLogger("grpc").level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("grpc").setLevel(grpc_level)


# --- metrics ------------------------------------------------------------------------------------


async def test_request_and_batch_metrics_match_model_statistics(demo_repository: Path) -> None:
    async with (
        serving(InferenceServer(config(demo_repository))) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        rows_sent = ok = 0
        for i, rows in enumerate([1, 2, 1, 2, 1, 1, 2]):
            await client.infer("mlp", mlp_input(rows, i))
            rows_sent, ok = rows_sent + rows, ok + 1
        # A concurrent burst, so some batches hold several requests.
        burst = [1 + i % 2 for i in range(8)]
        await asyncio.gather(*(client.infer("mlp", mlp_input(r, 100 + r)) for r in burst))
        rows_sent, ok = rows_sent + sum(burst), ok + len(burst)

        bad_input = {"no_such_input": np.zeros((1, 64), np.float32)}
        invalid = [await code_of(client.infer("mlp", bad_input)) for _ in range(3)]
        missing = [await code_of(client.infer("no_such_model", mlp_input(1))) for _ in range(2)]
        assert invalid == ["INVALID_ARGUMENT"] * 3
        assert missing == ["NOT_FOUND"] * 2
        stats = (await client.status("mlp"))[0].statistics

    r = srv.metrics.registry
    requests = "inferd_requests_total"
    ok_labels = {"protocol": "native", "model": "mlp", "code": "OK"}
    assert r.get_sample_value(requests, {**ok_labels, "version": "1"}) == ok
    assert sample_total(r, requests, **ok_labels) == ok
    assert sample_total(r, requests, model="mlp", code="INVALID_ARGUMENT") == len(invalid)
    assert sample_total(r, requests, model="", code="NOT_FOUND") == len(missing)
    assert sample_total(r, requests) == ok + len(invalid) + len(missing)
    assert {s.labels["protocol"] for s in samples(r, requests) if s.value} == {"native"}
    # The Open Inference Protocol's series exist from load, at zero.
    assert r.get_sample_value(requests, {**ok_labels, "protocol": "oip", "version": "1"}) == 0
    answered = ok + len(invalid)
    assert sample_total(r, "inferd_request_duration_seconds_count", model="mlp") == answered
    le_inf = sample_total(r, "inferd_request_duration_seconds_bucket", model="mlp", le="+Inf")
    assert le_inf == answered
    assert sample_total(r, "inferd_request_duration_seconds_sum", model="mlp") > 0

    mv = {"model": "mlp", "version": "1"}
    executions = r.get_sample_value("inferd_execution_count_total", mv)
    assert r.get_sample_value("inferd_inference_count_total", mv) == rows_sent
    assert r.get_sample_value("inferd_batch_size_sum", mv) == rows_sent
    assert r.get_sample_value("inferd_batch_size_count", mv) == executions
    assert executions is not None and 1 <= executions <= ok
    assert r.get_sample_value("inferd_queue_duration_seconds_count", mv) == ok
    assert r.get_sample_value("inferd_compute_duration_seconds_count", mv) == executions
    # A version's series exist from its first event on, at 0 until counted (rate() over a
    # series that appears mid-window misses its first increments).
    assert r.get_sample_value("inferd_batch_failures_total", mv) == 0
    assert r.get_sample_value("inferd_queue_depth", mv) == 0
    assert r.get_sample_value("inferd_batches_in_flight", mv) == 0

    # The same figures as the core's own counters (GetModelStatus).
    assert stats["inference_count"] == rows_sent
    assert stats["execution_count"] == executions
    assert stats["request_success"] == ok
    assert sum(stats["batch_sizes"].values()) == executions
    assert sum(size * n for size, n in stats["batch_sizes"].items()) == rows_sent
    print(f"\nmlp: {ok} OK requests, {rows_sent} rows in {executions:.0f} batches; {stats}")


async def test_rejections_are_counted_by_reason(flood_repository: Path) -> None:
    async with (
        serving(InferenceServer(config(flood_repository))) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        seen: Counter[str] = Counter()
        for _ in range(5):  # one flood is plenty; a few more only if the first never filled
            seen.update(
                await asyncio.gather(
                    *(code_of(client.infer("cnn", cnn_input())) for _ in range(40))
                )
            )
            if seen["RESOURCE_EXHAUSTED"]:
                break
        assert set(seen) <= {"OK", "RESOURCE_EXHAUSTED"}, seen
        assert seen["RESOURCE_EXHAUSTED"] > 0, (
            f"40 concurrent requests never filled a queue of 1: {seen}"
        )

        # timeout_us=1: the deadline has passed by the time the request reaches the queue.
        stream = [
            StreamRequest("cnn", cnn_input(), request_id=f"d{i}", timeout_us=1) for i in range(5)
        ]
        results = [result async for result in client.infer_stream(stream)]
        deadline_codes = [r.error.code.name if r.error else "OK" for r in results]
        assert deadline_codes == ["DEADLINE_EXCEEDED"] * len(stream)
        stats = (await client.status("cnn"))[0].statistics

    r = srv.metrics.registry
    mv = {"model": "cnn", "version": "1"}
    rejections = "inferd_rejections_total"
    assert (
        r.get_sample_value(rejections, {**mv, "reason": "queue_full"}) == seen["RESOURCE_EXHAUSTED"]
    )
    assert r.get_sample_value(rejections, {**mv, "reason": "deadline"}) == len(stream)
    assert sample_total(r, rejections) == seen["RESOURCE_EXHAUSTED"] + len(stream)
    requests = "inferd_requests_total"
    assert (
        sample_total(r, requests, model="cnn", code="RESOURCE_EXHAUSTED")
        == seen["RESOURCE_EXHAUSTED"]
    )
    assert sample_total(r, requests, model="cnn", code="DEADLINE_EXCEEDED") == len(stream)
    assert sample_total(r, requests, model="cnn", code="OK") == seen["OK"]
    assert stats["request_failure"] == seen["RESOURCE_EXHAUSTED"] + len(stream)
    assert r.get_sample_value("inferd_queue_capacity", mv) == 1
    assert r.get_sample_value("inferd_queue_depth", mv) == 0
    # max_batch_size = 1: every batch is one row.
    assert r.get_sample_value("inferd_batch_size_sum", mv) == seen["OK"]
    assert r.get_sample_value("inferd_batch_size_bucket", {**mv, "le": "1.0"}) == seen["OK"]
    print(f"\ncnn flood: {dict(seen)}; deadline rejections {len(stream)}")


async def test_grpc_deadline_expiring_in_queue_counts_as_deadline(gated_repository: Path) -> None:
    gate = Gate()
    srv = InferenceServer(config(gated_repository), session_factory=gated_factory(gate))
    async with serving(srv), AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
        gate.close()
        try:
            held = asyncio.ensure_future(client.infer("mlp", mlp_input(1)))
            r = srv.metrics.registry
            mv = {"model": "mlp", "version": "1"}
            await wait_until(
                lambda: r.get_sample_value("inferd_batches_in_flight", mv) == 1, "the held batch"
            )
            late = asyncio.gather(
                *(code_of(client.infer("mlp", mlp_input(1), timeout=0.3)) for _ in range(3))
            )
            await wait_until(lambda: r.get_sample_value("inferd_queue_depth", mv) == 3, "3 queued")
            # Block the loop across the deadlines, as a busy server is late.
            time.sleep(0.6)  # noqa: ASYNC251
            codes = await late
        finally:
            gate.open()
        await held
    assert codes == ["DEADLINE_EXCEEDED"] * 3
    recorded = {
        "rejected as deadline": sample_total(r, "inferd_rejections_total", reason="deadline"),
        "rejected as cancelled": sample_total(r, "inferd_rejections_total", reason="cancelled"),
        "answered DEADLINE_EXCEEDED": sample_total(
            r, "inferd_requests_total", model="mlp", code="DEADLINE_EXCEEDED"
        ),
        "answered CANCELLED": sample_total(
            r, "inferd_requests_total", model="mlp", code="CANCELLED"
        ),
    }
    assert recorded == {
        "rejected as deadline": 3,
        "rejected as cancelled": 0,
        "answered DEADLINE_EXCEEDED": 3,
        "answered CANCELLED": 0,
    }


async def test_unknown_model_names_do_not_create_series(mlp_repository: Path) -> None:
    async with (
        serving(InferenceServer(config(mlp_repository))) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        for i in range(20):
            assert await code_of(client.infer(f"probe-{i}", mlp_input(1))) == "NOT_FOUND"
    labels = {s.labels["model"] for s in samples(srv.metrics.registry, "inferd_requests_total")}
    assert len(labels - {"mlp"}) <= 1, f"{len(labels)} model label values: {sorted(labels)[:5]}..."


async def test_state_capacity_and_load_gauges(demo_repository: Path) -> None:
    async with (
        serving(InferenceServer(config(demo_repository))) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        models = await client.list_models()
        capacities = {name: (await client.metadata(name)).batching for name in models}
        r = srv.metrics.registry
        states = {
            (name, state.value): r.get_sample_value(
                "inferd_model_state", {"model": name, "version": "1", "state": state.value}
            )
            for name in models
            for state in ModelState
        }
    assert sorted(models) == ["cnn", "echo_bytes", "mlp", "text_encoder"]
    for name in models:
        mv = {"model": name, "version": "1"}
        want = capacities[name]["max_queue_size"]
        assert r.get_sample_value("inferd_queue_capacity", mv) == want, name
        for state in ModelState:
            expected = 1 if state is ModelState.READY else 0
            assert states[name, state.value] == expected, (name, state)
        load = r.get_sample_value("inferd_model_load_duration_seconds", mv)
        assert load is not None and load > 0, name
        # After stop() every version is UNLOADED, and still exactly one state is 1.
        after = {
            s.value: r.get_sample_value("inferd_model_state", {**mv, "state": s.value})
            for s in ModelState
        }
        assert after["UNLOADED"] == 1 and sum(after.values()) == 1, (name, after)
    assert r.get_sample_value("inferd_queue_capacity", {"model": "mlp", "version": "1"}) == 1024
    assert r.get_sample_value("inferd_queue_capacity", {"model": "cnn", "version": "1"}) == 256


def _http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


async def test_metrics_endpoint_serves_prometheus_text(mlp_repository: Path) -> None:
    async with (
        serving(InferenceServer(config(mlp_repository, metrics_port=0))) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        assert srv.metrics_port > 0
        await client.infer("mlp", mlp_input(2))
        status, content_type, text = await asyncio.to_thread(
            _http_get, f"http://127.0.0.1:{srv.metrics_port}/metrics"
        )
    assert status == 200
    assert content_type.startswith("text/plain")
    for name in (
        "inferd_requests_total",
        "inferd_request_duration_seconds_bucket",
        "inferd_queue_duration_seconds_bucket",
        "inferd_compute_duration_seconds_bucket",
        "inferd_batch_size_bucket",
        "inferd_inference_count_total",
        "inferd_execution_count_total",
        "inferd_queue_depth",
        "inferd_queue_capacity",
        "inferd_batches_in_flight",
        "inferd_model_state",
        "inferd_model_load_duration_seconds",
    ):
        assert f"\n{name}{{" in text, name
    for name in ("inferd_rejections_total", "inferd_batch_failures_total"):
        assert f"# TYPE {name} counter" in text, name
    line = 'inferd_requests_total{code="OK",model="mlp",protocol="native",version="1"} 1.0'
    assert line in text
    assert 'inferd_inference_count_total{model="mlp",version="1"} 2.0' in text
    assert "inferd_gpu_" not in text  # no GPU here, or the series would be below


async def test_metrics_endpoint_off_with_port_minus_one(mlp_repository: Path) -> None:
    async with serving(InferenceServer(config(mlp_repository, metrics_port=-1))) as srv:
        assert srv.metrics_port == 0


async def test_stop_releases_the_metrics_port(mlp_repository: Path) -> None:
    async with serving(InferenceServer(config(mlp_repository, metrics_port=0))) as srv:
        port = srv.metrics_port
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


async def test_custom_latency_buckets(mlp_repository: Path) -> None:
    buckets = (0.001, 0.01, 0.25, 2.0)
    async with (
        serving(InferenceServer(config(mlp_repository, latency_buckets=buckets))) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        await client.infer("mlp", mlp_input(1))
    r = srv.metrics.registry
    expected = [*(str(float(b)) for b in buckets), "+Inf"]
    for name in (
        "inferd_request_duration_seconds",
        "inferd_queue_duration_seconds",
        "inferd_compute_duration_seconds",
    ):
        les = [
            s.labels["le"]
            for s in samples(r, f"{name}_bucket")
            if s.labels.get("protocol", "native") == "native"
        ]
        assert les == expected, name
        assert sample_total(r, f"{name}_bucket", le="+Inf") == 1, name
    # The batch-size histogram keeps its own (row) buckets.
    assert "1024.0" in {s.labels["le"] for s in samples(r, "inferd_batch_size_bucket")}


# --- traces -------------------------------------------------------------------------------------


async def test_traces_follow_the_client_and_link_batches(gated_repository: Path) -> None:
    exporter = InMemorySpanExporter()
    gate = Gate()
    srv = InferenceServer(
        config(gated_repository),
        session_factory=gated_factory(gate),
        span_processor=SimpleSpanProcessor(exporter),
    )
    tracer, caller_spans = client_tracer()
    rows = {f"req-{i}": 1 + i % 3 for i in range(6)}
    async with serving(srv), AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
        gate.close()
        try:
            with tracer.start_as_current_span("caller") as caller:
                first, *rest = rows
                held = asyncio.ensure_future(
                    client.infer("mlp", mlp_input(rows[first]), request_id=first)
                )
                r, mv = srv.metrics.registry, {"model": "mlp", "version": "1"}
                await wait_until(
                    lambda: r.get_sample_value("inferd_batches_in_flight", mv) == 1, "first batch"
                )
                queued = asyncio.gather(
                    *(client.infer("mlp", mlp_input(rows[i]), request_id=i) for i in rest)
                )
                await wait_until(
                    lambda: r.get_sample_value("inferd_queue_depth", mv) == len(rest),
                    "the others to queue",
                )
                gate.open()
                await held
                await queued
        finally:
            gate.open()
    spans = exporter.get_finished_spans()
    caller_ctx = caller.get_span_context()

    requests = by_name(spans, PREDICT_SPAN)
    assert len(requests) == len(rows)
    request_rows: dict[int, int] = {}
    for span in requests:
        assert span.context.trace_id == caller_ctx.trace_id
        assert span.parent is not None and span.parent.span_id == caller_ctx.span_id
        assert span.parent.is_remote
        attributes = span.attributes or {}
        assert attributes["inferd.model"] == "mlp" and attributes["inferd.version"] == 1
        request_rows[span.context.span_id] = rows[str(attributes["inferd.request_id"])]
        kids = Counter(s.name for s in children_of(spans, span))
        assert kids["queue"] == 1 and kids["encode"] == 1, kids

    batches = by_name(spans, "batch")
    linked: list[int] = []
    for batch in batches:
        link_ids = [link.context.span_id for link in batch.links]
        assert set(link_ids) <= set(request_rows)
        linked += link_ids
        attributes = batch.attributes or {}
        assert attributes["inferd.model"] == "mlp"
        assert attributes["inferd.version"] == 1
        assert attributes["inferd.requests"] == len(link_ids)
        assert attributes["inferd.rows"] == sum(request_rows[i] for i in link_ids)
        assert batch.context.trace_id == caller_ctx.trace_id
        assert batch.parent is not None and batch.parent.span_id in link_ids
    assert sorted(linked) == sorted(request_rows), "each request is served by exactly one batch"
    # The held batch, then everything that queued behind it as one batch.
    assert sorted(len(b.links) for b in batches) == [1, len(rows) - 1]
    assert [s.name for s in caller_spans.get_finished_spans()] == ["caller"]


async def test_request_without_client_context_starts_its_own_trace(mlp_repository: Path) -> None:
    exporter = InMemorySpanExporter()
    async with (
        serving(traced_server(mlp_repository, exporter)) as srv,
        AsyncInferClient(f"127.0.0.1:{srv.port}") as client,
    ):
        await client.infer("mlp", mlp_input(2), request_id="a")
        await client.infer("mlp", mlp_input(1), request_id="b")
    spans = exporter.get_finished_spans()
    requests = by_name(spans, PREDICT_SPAN)
    assert len(requests) == 2
    assert all(s.parent is None for s in requests)
    assert requests[0].context.trace_id != requests[1].context.trace_id
    for span in requests:
        same_trace = [s for s in spans if s.context.trace_id == span.context.trace_id]
        assert Counter(s.name for s in same_trace) == Counter(
            {PREDICT_SPAN: 1, "queue": 1, "encode": 1, "batch": 1}
        )
        (batch,) = by_name(same_trace, "batch")
        assert [link.context.span_id for link in batch.links] == [span.context.span_id]
        rows = 2 if (span.attributes or {})["inferd.request_id"] == "a" else 1
        assert (batch.attributes or {})["inferd.rows"] == rows


async def test_sampling_is_parent_based(mlp_repository: Path) -> None:
    exporter = InMemorySpanExporter()
    tracer, _ = client_tracer()
    srv = traced_server(mlp_repository, exporter, tracing={"sample_ratio": 0.0})
    async with serving(srv), AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
        for _ in range(3):
            await client.infer("mlp", mlp_input(1))
        assert exporter.get_finished_spans() == ()
        with tracer.start_as_current_span("caller") as caller:
            await client.infer("mlp", mlp_input(1))
    spans = exporter.get_finished_spans()
    assert Counter(s.name for s in spans) == Counter(
        {PREDICT_SPAN: 1, "queue": 1, "encode": 1, "batch": 1}
    )
    assert {s.context.trace_id for s in spans} == {caller.get_span_context().trace_id}


async def test_tracing_off_by_default(mlp_repository: Path) -> None:
    srv = InferenceServer(config(mlp_repository))
    assert srv.tracer_provider is None
    async with serving(srv), AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
        await client.infer("mlp", mlp_input(1))


# --- logs ---------------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def capture_root_handler() -> io.StringIO:
    """Point the handler configure_logging() installed at a buffer."""
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    assert any(isinstance(f, TraceIdFilter) for f in handler.filters)
    buffer = io.StringIO()
    handler.setStream(buffer)
    return buffer


@pytest.mark.usefixtures("restore_logging")
def test_json_log_lines_carry_the_current_trace() -> None:
    configure_logging("INFO", "json")
    buffer = capture_root_handler()
    tracer, _ = client_tracer()
    log = logging.getLogger("inferd.test")
    log.info("outside")
    with tracer.start_as_current_span("work") as span:
        log.info("inside %d", 1)
    outside, inside = json_lines(buffer.getvalue())
    assert outside["message"] == "outside" and "trace_id" not in outside
    assert inside["message"] == "inside 1"
    assert inside["level"] == "INFO" and inside["logger"] == "inferd.test" and inside["time"]
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")


@pytest.mark.usefixtures("restore_logging")
async def test_access_log_inside_a_traced_request(mlp_repository: Path) -> None:
    configure_logging("INFO", "json")
    buffer = capture_root_handler()
    exporter = InMemorySpanExporter()
    tracer, _ = client_tracer()
    srv = traced_server(mlp_repository, exporter, access_log_sample_ratio=1.0)
    async with serving(srv), AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
        with tracer.start_as_current_span("caller") as caller:
            await client.infer("mlp", mlp_input(1), request_id="logged")
    (server_span,) = by_name(exporter.get_finished_spans(), PREDICT_SPAN)
    access = [r for r in json_lines(buffer.getvalue()) if r.get("logger") == ACCESS_LOGGER]
    assert len(access) == 1, access
    (record,) = access
    assert record["trace_id"] == format(caller.get_span_context().trace_id, "032x")
    assert record["span_id"] == format(server_span.context.span_id, "016x")
    assert record["model"] == "mlp" and record["code"] == "OK" and record["version"] == 1
    assert record["protocol"] == "native" and record["duration_ms"] > 0
    serving_lines = [r for r in json_lines(buffer.getvalue()) if "serving" in r["message"]]
    assert serving_lines and "trace_id" not in serving_lines[0]


@pytest.mark.parametrize("ratio", [1.0, 0.0])
async def test_access_log_sampling(
    mlp_repository: Path, ratio: float, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    srv = InferenceServer(config(mlp_repository, access_log_sample_ratio=ratio))
    async with serving(srv), AsyncInferClient(f"127.0.0.1:{srv.port}") as client:
        for rows in (1, 2, 3):
            await client.infer("mlp", mlp_input(rows))
        bad = await code_of(client.infer("mlp", {"nope": np.zeros((1, 64), np.float32)}))
    assert bad == "INVALID_ARGUMENT"
    records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    if ratio == 0:
        assert records == []
        return
    assert [(r.model, r.code) for r in records] == [("mlp", "OK")] * 3 + [
        ("mlp", "INVALID_ARGUMENT")
    ]
    assert all(r.duration_ms > 0 and r.protocol == "native" for r in records)


# --- GPU ----------------------------------------------------------------------------------------


class FakeNvml:
    """The NVML calls GpuCollector makes, over a fixed list of GPUs."""

    class Error(Exception):
        pass

    def __init__(self, gpus: Sequence[dict[str, Any]], init_fails: bool = False) -> None:
        self.gpus = list(gpus)
        self.init_fails = init_fails

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise FakeNvml.Error("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str | bytes:
        return self.gpus[handle]["uuid"]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        if self.gpus[handle].get("broken"):
            raise FakeNvml.Error("GPU is lost")
        return SimpleNamespace(gpu=self.gpus[handle]["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        g = self.gpus[handle]
        return SimpleNamespace(used=g["used"], total=g["total"], free=g["total"] - g["used"])

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self.gpus[handle]["milliwatts"])


FAKE_GPUS = [
    {"uuid": b"GPU-aaaa", "util": 37, "used": 3 << 30, "total": 80 << 30, "milliwatts": 215500},
    {"uuid": "GPU-bbbb", "util": 100, "used": 0, "total": 40 << 30, "milliwatts": 61000},
]
GPU_METRICS = (
    "inferd_gpu_utilization",
    "inferd_gpu_memory_used_bytes",
    "inferd_gpu_memory_total_bytes",
    "inferd_gpu_power_usage_watts",
)


def fake_gpu_registry(gpus: Sequence[dict[str, Any]] = FAKE_GPUS) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GpuCollector(nvml=FakeNvml(gpus)))
    return registry


def _real_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def test_gpu_metrics_absent_without_a_gpu(mlp_repository: Path) -> None:
    gpus = _real_gpu_count()
    collector = GpuCollector()
    assert collector.gpus == gpus
    srv = InferenceServer(config(mlp_repository))
    assert srv.gpu_metrics.gpus == gpus
    r = srv.metrics.registry
    names = {f.name for f in r.collect()}
    if gpus == 0:  # this (CPU) machine: absent, not zero
        assert not any(n.startswith("inferd_gpu_") for n in names), names
        assert r.get_sample_value("inferd_gpu_utilization", {"gpu_uuid": "GPU-0"}) is None
        assert list(collector.collect()) == []
    else:
        assert set(GPU_METRICS) <= names
    assert GpuCollector(nvml=FakeNvml(FAKE_GPUS, init_fails=True)).gpus == 0


def test_gpu_metrics_from_nvml() -> None:
    collector = GpuCollector(nvml=FakeNvml(FAKE_GPUS))
    assert collector.gpus == 2
    r = fake_gpu_registry()
    expected = {
        "GPU-aaaa": (0.37, 3 << 30, 80 << 30, 215.5),
        "GPU-bbbb": (1.0, 0, 40 << 30, 61.0),
    }
    for uuid, values in expected.items():
        for name, value in zip(GPU_METRICS, values, strict=True):
            got = r.get_sample_value(name, {"gpu_uuid": uuid})
            assert got == pytest.approx(value), (name, uuid)
    for name in GPU_METRICS:
        assert [s.labels for s in samples(r, name)] == [
            {"gpu_uuid": "GPU-aaaa"},
            {"gpu_uuid": "GPU-bbbb"},
        ]


def test_gpu_read_failure_drops_only_that_gpu() -> None:
    gpus = [FAKE_GPUS[0] | {"broken": True}, FAKE_GPUS[1]]
    r = fake_gpu_registry(gpus)
    for name in GPU_METRICS:
        assert [s.labels["gpu_uuid"] for s in samples(r, name)] == ["GPU-bbbb"], name


# --- a version's series: from READY until the registry forgets it -------------------------------


def _series_of(r: CollectorRegistry, model: str, version: str | None = None) -> list[Any]:
    return [
        s
        for f in r.collect()
        for s in f.samples
        if s.labels.get("model") == model and (version is None or s.labels["version"] == version)
    ]


def _one_batch(model: str, version: int) -> Any:
    return BatchReport(
        model, version, 2, (1e-4, 2e-4), (None, None), 1e-3, 1e-4, 8e-4, 1e-4, None, 0
    )


def test_a_ready_versions_series_exist_at_zero_before_any_request() -> None:
    metrics = PrometheusObserver()
    r = metrics.registry
    metrics.model_state_changed("m", 1, ModelState.LOADING, "", None)
    assert r.get_sample_value("inferd_batch_size_count", {"model": "m", "version": "1"}) is None
    metrics.model_state_changed("m", 1, ModelState.READY, "", 0.5)
    mv = {"model": "m", "version": "1"}
    for protocol in ("native", "oip"):
        labels = {**mv, "protocol": protocol}
        assert r.get_sample_value("inferd_requests_total", {**labels, "code": "OK"}) == 0
        assert r.get_sample_value("inferd_request_duration_seconds_count", labels) == 0
    for name in (
        "inferd_queue_duration_seconds_count",
        "inferd_compute_duration_seconds_count",
        "inferd_batch_size_count",
        "inferd_inference_count_total",
        "inferd_execution_count_total",
        "inferd_batch_failures_total",
        "inferd_queue_depth",
        "inferd_batches_in_flight",
    ):
        assert r.get_sample_value(name, mv) == 0, name
    for reason in RejectReason:
        assert r.get_sample_value("inferd_rejections_total", {**mv, "reason": reason.value}) == 0
    assert r.get_sample_value("inferd_model_load_duration_seconds", mv) == 0.5


def test_a_forgotten_version_takes_every_series_with_it() -> None:
    metrics = PrometheusObserver()
    r = metrics.registry
    for version in (1, 2):
        metrics.model_state_changed("m", version, ModelState.LOADING, "", None)
        metrics.model_state_changed("m", version, ModelState.READY, "", 0.1)
        metrics.queue_capacity_set("m", version, 8)
        metrics.batch_finished(_one_batch("m", version))
        metrics.request_finished("native", "m", version, "OK", 0.01)
        metrics.request_finished("oip", "m", version, "INVALID_ARGUMENT", 0.01)
        metrics.request_rejected("m", version, RejectReason.QUEUE_FULL)
    metrics.request_finished("native", "m", None, "NOT_FOUND", 0.01)
    metrics.model_state_changed("other", 1, ModelState.READY, "", 0.1)
    assert _series_of(r, "m", "1")

    metrics.model_state_changed("m", 1, ModelState.UNLOADING, "", None)
    metrics.model_state_changed("m", 1, ModelState.UNLOADED, "", None)
    assert r.get_sample_value(
        "inferd_model_state", {"model": "m", "version": "1", "state": "UNLOADED"}
    ), "listed while retained"
    metrics.model_state_changed("m", 1, ModelState.UNKNOWN, "forgotten", None)
    assert _series_of(r, "m", "1") == []
    assert _series_of(r, "m", "2"), "the other version's stay"
    assert _series_of(r, "m", ""), "the model's own, while one of its versions is listed"

    metrics.model_state_changed("m", 2, ModelState.UNKNOWN, "forgotten", None)
    assert _series_of(r, "m") == [], "the model's own go with its last version"
    assert _series_of(r, "other", "1"), "other models keep theirs"

    # Back again (republished): series from READY on, counting from zero.
    metrics.model_state_changed("m", 1, ModelState.READY, "", 0.1)
    labels = {"protocol": "native", "model": "m", "version": "1", "code": "OK"}
    assert r.get_sample_value("inferd_requests_total", labels) == 0
    metrics.request_finished("native", "m", 1, "OK", 0.01)
    assert r.get_sample_value("inferd_requests_total", labels) == 1


def test_repository_problems_gauge_follows_the_latest_scan() -> None:
    metrics = PrometheusObserver()
    r = metrics.registry
    first = RepositoryProblem("a", "a/²", "not_a_version", "not a version directory")
    second = RepositoryProblem("b\\xff", "b\\xff", "invalid_name", "not a model name")
    metrics.repository_problems_changed([first, second])
    labels = {"model": "a", "path": "a/²", "problem": "not_a_version"}
    assert r.get_sample_value("inferd_repository_problems", labels) == 1
    metrics.repository_problems_changed([second])
    assert r.get_sample_value("inferd_repository_problems", labels) is None
    assert [s.labels["path"] for s in samples(r, "inferd_repository_problems")] == ["b\\xff"]
    metrics.repository_problems_changed([])
    assert samples(r, "inferd_repository_problems") == []
