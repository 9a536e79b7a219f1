"""Model lifecycle against real `inferd serve` subprocesses over loopback gRPC: rolling new
versions out under continuous load, reloading a changed file, versions written slowly or
waiting for their `.ready` marker, unloading with requests queued, explicit Load/Unload (after
`inferd models add`), the control plane's token and name checks, WatchModelStatus, and the RSS
of 20 load/unload cycles.

Every model here except the CNN computes y = x + c (FP32 [batch, 4]) with c equal to its
version number (or another constant where a test says so), so each output proves which file
computed it, and the response's `version` field must agree.

Nothing here asserts on timing: every wait is a poll with a bound (WAIT), and the rollout's
load is bounded in time by those waits. Where a test needs the server to have scanned the
repository (twice), it publishes a probe model and waits until the probe is READY, which
takes two scans in poll mode (one with a required marker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from integration_support import (
    PROJECT_ROOT,
    Callers,
    ServerFactory,
    ServerProcess,
    add_summary_line,
    server_env,
    wait_until,
)

from inferd.core.models.control import READY_MARKER
from inferd.demo_models import CNN_CONFIG, build_adder, build_cnn, write_model
from inferd_client import AsyncInferClient, InferError
from inferd_wire.codec import from_wire, to_wire
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2,
    model_repository_pb2_grpc,
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    tensor_pb2,
)

TOKEN = "lifecycle-test-token"
POLL_S = 0.2
# Bound of every wait (real seconds: a subprocess server, real threads).
WAIT = 30.0
RPC_TIMEOUT = 10.0
CLIENTS = 8
# Requests each client answers after a step before the next one (so every client sees it).
RESPONSES_PER_STEP = 25

# Without a marker, a version loads once its files have stayed unchanged for SETTLE_S across
# scans: well above the slow writer's pauses (test_slowly_written_version_...).
SETTLE_S = 1.5
POLL_ENV = {
    "INFERD_MODEL_CONTROL": "poll",
    "INFERD_POLL_INTERVAL_S": str(POLL_S),
    "INFERD_SETTLE_S": str(SETTLE_S),
    "INFERD_CONTROL_TOKEN": TOKEN,
}
# An explicit Load of files first seen (again after an Unload) waits out settle_s: kept short
# so that 20 load/unload cycles stay quick.
EXPLICIT_ENV = {
    "INFERD_MODEL_CONTROL": "explicit",
    "INFERD_SETTLE_S": "0.2",
    "INFERD_CONTROL_TOKEN": TOKEN,
}

STATE = {v: k.removeprefix("MODEL_STATE_") for k, v in model_status_pb2.ModelState.items()}


# --- models and publishing -----------------------------------------------------------------------


def adder_bytes(c: float) -> bytes:
    return build_adder(c).SerializeToString(deterministic=True)


GARBAGE = b"\x08\x07 this is not an ONNX model \xff\xfe" * 8


def publish(model_dir: Path, version: int, content: bytes, marker: bool = False) -> Path:
    """The safe way: write into a hidden temporary directory inside the model directory, then
    rename it into place as `<model>/<version>` (one atomic step for a poller)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".publish-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(content)
    if marker:
        (staging / READY_MARKER).touch()
    target = model_dir / str(version)
    os.rename(staging, target)
    return target


def append(path: Path, chunk: bytes) -> None:
    with path.open("ab") as f:
        f.write(chunk)


def replace_file(path: Path, content: bytes) -> None:
    """Overwrite a published file the safe way: temp file beside the version dirs, os.replace."""
    temporary = path.parent.parent / f".replace-{uuid.uuid4().hex[:8]}"
    temporary.write_bytes(content)
    os.replace(temporary, path)


# --- gRPC helpers --------------------------------------------------------------------------------


def row(i: int) -> np.ndarray:
    """A distinct input row per client; small integers, so x + c is exact in FP32."""
    return (np.arange(4, dtype=np.float32) + 10 * i).reshape(1, 4)


def predict_request(
    model: str, x: np.ndarray, version: int | None = None
) -> predict_pb2.PredictRequest:
    datatype, shape, contents = to_wire(x)
    request = predict_pb2.PredictRequest(
        model=model,
        inputs=[tensor_pb2.Tensor(name="x", datatype=datatype, shape=shape, contents=contents)],
    )
    if version is not None:
        request.version = version
    return request


def added_constant(response: predict_pb2.PredictResponse, x: np.ndarray) -> float:
    """The c the serving file added to every element (NaN if the elements disagree)."""
    (tensor,) = response.outputs
    y = from_wire(tensor.datatype, tensor.shape, tensor.contents)
    added = y - x
    return float(added.flat[0]) if np.all(added == added.flat[0]) else float("nan")


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.predict = predict_pb2_grpc.PredictStub(channel)
        self.status = model_status_pb2_grpc.ModelStatusStub(channel)
        self.repository = model_repository_pb2_grpc.ModelRepositoryStub(channel)


@contextlib.asynccontextmanager
async def stubs_of(server: ServerProcess) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield Stubs(channel)


async def version_states(stubs: Stubs, model: str) -> dict[int, tuple[str, str]]:
    """version -> (state, reason); {} while the server does not know the model."""
    try:
        response = await stubs.status.GetModelStatus(
            model_status_pb2.GetModelStatusRequest(model=model), timeout=RPC_TIMEOUT
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise
    return {v.version: (STATE[v.state], v.reason) for v in response.versions}


async def wait_state(stubs: Stubs, model: str, version: int, state: str) -> str:
    """Wait until `version` of `model` is in `state`; returns its reason."""

    async def reached() -> bool:
        return (await version_states(stubs, model)).get(version, ("", ""))[0] == state

    await wait_until(reached, f"{model} v{version} {state}")
    return (await version_states(stubs, model))[version][1]


async def newest_ready(stubs: Stubs, model: str) -> int | None:
    ready = [v for v, (s, _) in (await version_states(stubs, model)).items() if s == "READY"]
    return max(ready, default=None)


async def scans_passed(stubs: Stubs, repository: Path, marker: bool = False) -> None:
    """Return once the server has scanned the repository at least twice since the call (one
    scan with `marker`): a new probe model is READY only then."""
    name = f"probe-{uuid.uuid4().hex[:8]}"
    publish(repository / name, 1, adder_bytes(0.0), marker=marker)
    await wait_state(stubs, name, 1, "READY")


@contextlib.asynccontextmanager
async def watching(
    stubs: Stubs, model: str
) -> AsyncIterator[list[model_status_pb2.ModelStatusEvent]]:
    """WatchModelStatus(model) collected into a list in the background until exit."""
    events: list[model_status_pb2.ModelStatusEvent] = []
    call = stubs.status.WatchModelStatus(model_status_pb2.WatchModelStatusRequest(model=model))

    async def collect() -> None:
        async for event in call:
            events.append(event)

    task = asyncio.get_running_loop().create_task(collect())
    try:
        await wait_until(lambda: bool(events), f"the current state of {model} on the watch")
        yield events
    finally:
        call.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def control_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metric_value(server: ServerProcess, name: str, labels: dict[str, str]) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(wanted)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def inferd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
        env=server_env(),
    )


# --- continuous load -----------------------------------------------------------------------------


class Load(Callers):
    """CLIENTS tasks, each on its own channel, sending one request after another to `model`
    (no version asked) until stopped; every answer and failure is recorded per client."""

    def __init__(self, target: str, model: str, clients: int = CLIENTS) -> None:
        super().__init__(clients)
        self.target = target
        self.model = model
        # Per client: (version in the response, the constant its output shows).
        self.answers: list[list[tuple[int, float]]] = [[] for _ in range(clients)]
        self.failures: list[tuple[int, str, str]] = []

    async def _caller(self, i: int) -> None:
        x = row(i)
        request = predict_request(self.model, x)
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = predict_pb2_grpc.PredictStub(channel)
            while not self.stopping:
                try:
                    response = await stub.Predict(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    self.failures.append((i, exc.code().name, exc.details() or ""))
                    await asyncio.sleep(0.01)
                    continue
                self.answers[i].append((response.version, added_constant(response, x)))

    async def each_client_answered(
        self, count: int, where: Callable[[int, float], bool], within: float = WAIT
    ) -> None:
        """Wait until every client has `count` more answers satisfying `where`."""
        base = [sum(1 for a in answers if where(*a)) for answers in self.answers]

        def done() -> bool:
            self.check_running()
            return all(
                sum(1 for a in answers if where(*a)) >= base[i] + count
                for i, answers in enumerate(self.answers)
            )

        await wait_until(done, f"every client answered {count} more times", within)

    @property
    def total(self) -> int:
        return sum(len(a) for a in self.answers) + len(self.failures)

    def per_version(self) -> dict[int, int]:
        return dict(sorted(Counter(v for answers in self.answers for v, _ in answers).items()))


# --- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poll_server(
    module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """Poll mode every POLL_S, control token set. Each test has models of its own:
    rollout v1, swap v3, slow v4, watched v1, watched_order v1 (c = version)."""
    repository = tmp_path_factory.mktemp("poll_repository")
    for name, version in (
        ("rollout", 1),
        ("swap", 3),
        ("slow", 4),
        ("watched", 1),
        ("watched_order", 1),
    ):
        write_model(build_adder(float(version)), repository, name, version)
    return module_server_factory(repository, env=POLL_ENV)


@pytest.fixture(scope="module")
def explicit_server(
    module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """Explicit model control, control token set. `queued` (c = 7) waits up to 10 minutes
    for a batch of 8 to fill."""
    repository = tmp_path_factory.mktemp("explicit_repository")
    write_model(
        build_adder(7.0),
        repository,
        "queued",
        1,
        "max_batch_size = 8\nmax_queue_delay_us = 600_000_000\n",
    )
    return module_server_factory(repository, env=EXPLICIT_ENV)


@pytest.fixture
def marker_server(start_server: ServerFactory, tmp_path: Path) -> ServerProcess:
    """Poll mode with require_ready_marker; `marked` v1 (c = 1) carries its marker."""
    repository = tmp_path / "marker_repository"
    publish(repository / "marked", 1, adder_bytes(1.0), marker=True)
    return start_server(repository, env={**POLL_ENV, "INFERD_REQUIRE_READY_MARKER": "true"})


# --- rollout -------------------------------------------------------------------------------------


async def test_rollout_under_continuous_load_fails_no_request(
    poll_server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    """v1 -> v2 -> v3, then a broken v4, while CLIENTS clients send without pause."""
    model_dir = poll_server.repository / "rollout"
    load = Load(poll_server.target, "rollout")
    states: dict[int, tuple[str, str]] = {}
    async with stubs_of(poll_server) as stubs:
        load.start()
        try:
            await load.each_client_answered(RESPONSES_PER_STEP, lambda v, c: v == 1)
            for version in (2, 3):
                publish(model_dir, version, adder_bytes(float(version)))

                async def is_newest(v: int = version) -> bool:
                    return await newest_ready(stubs, "rollout") == v

                await wait_until(is_newest, f"v{version} the newest READY")
                await load.each_client_answered(RESPONSES_PER_STEP, lambda v, c, n=version: v == n)
            publish(model_dir, 4, GARBAGE)
            await wait_state(stubs, "rollout", 4, "FAILED")
            # v3 keeps serving: every client gets answers after v4 failed (bounded short, as
            # nothing answers at all when v3 is gone).
            with contextlib.suppress(TimeoutError):
                await load.each_client_answered(RESPONSES_PER_STEP, lambda v, c: True, 5.0)
        finally:
            await load.stop()
            states = await version_states(stubs, "rollout")

    per_version = load.per_version()
    codes = Counter(code for _, code, _ in load.failures)
    figures = (
        f"rollout v1->v2->v3->broken v4 under {CLIENTS} clients: {load.total} requests sent, "
        f"{len(load.failures)} failed {dict(codes)}, answered per version {per_version}; "
        f"final states {{{', '.join(f'{v}: {s}' for v, (s, _) in sorted(states.items()))}}}"
    )
    print(f"\n{figures}")
    add_summary_line(request.config, figures)
    if load.failures:
        print("first failures:", load.failures[:3])

    assert load.failures == [], f"{len(load.failures)} failed requests, e.g. {load.failures[:3]}"
    for i, answers in enumerate(load.answers):
        wrong = [(v, c) for v, c in answers if c != float(v)]
        assert wrong == [], f"client {i}: outputs that are not x + version: {wrong[:5]}"
        versions = [v for v, _ in answers]
        assert versions == sorted(versions), f"client {i} went back to an older version"
        assert list(dict.fromkeys(versions)) == [1, 2, 3], f"client {i} saw {set(versions)}"
    assert states[4][0] == "FAILED" and states[4][1], states
    assert states[3] == ("READY", ""), states
    assert states[1][0] == states[2][0] == "UNLOADED", states


async def test_changed_file_of_the_same_version_is_swapped_without_a_failure(
    poll_server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    """swap v3 computes x + 3; its model.onnx is replaced by one computing x + 30."""
    model_file = poll_server.repository / "swap" / "3" / "model.onnx"
    load = Load(poll_server.target, "swap", clients=4)
    async with stubs_of(poll_server) as stubs:
        load.start()
        try:
            await load.each_client_answered(RESPONSES_PER_STEP, lambda v, c: c == 3.0)
            replace_file(model_file, adder_bytes(30.0))
            await load.each_client_answered(RESPONSES_PER_STEP, lambda v, c: c == 30.0)
        finally:
            await load.stop()
        states = await version_states(stubs, "swap")

    constants = Counter(c for answers in load.answers for _, c in answers)
    figures = (
        f"same-version file swap under 4 clients: {load.total} requests, "
        f"{len(load.failures)} failed, answered by old file {constants[3.0]}, "
        f"by new file {constants[30.0]}"
    )
    print(f"\n{figures}")
    add_summary_line(request.config, figures)
    assert load.failures == [], load.failures[:3]
    for i, answers in enumerate(load.answers):
        assert {v for v, _ in answers} == {3}, f"client {i}"
        sequence = list(dict.fromkeys(c for _, c in answers))
        assert sequence == [3.0, 30.0], f"client {i}: constants in order {sequence}"
        assert answers[-1] == (3, 30.0)
    assert states == {3: ("READY", "")}


# --- incomplete versions -------------------------------------------------------------------------


async def test_slowly_written_version_is_not_loaded_half_way(poll_server: ServerProcess) -> None:
    """slow v5's model.onnx is written in 3 chunks with pauses of 0.6 s: about three scans
    (every 0.2 s) see each half-written state unchanged, but not for the server's settle_s
    (SETTLE_S). A writer pausing longer than settle_s is only safe with rename or the marker
    (docs/operations.md), which the other tests use."""
    repository = poll_server.repository
    content = adder_bytes(5.0)
    third = len(content) // 3
    chunks = [content[:third], content[third : 2 * third], content[2 * third :]]
    version_dir = repository / "slow" / "5"
    async with stubs_of(poll_server) as stubs, watching(stubs, "slow") as events:
        version_dir.mkdir()
        for chunk in chunks[:-1]:
            append(version_dir / "model.onnx", chunk)
            await asyncio.sleep(0.6)
        append(version_dir / "model.onnx", chunks[-1])
        during_write = [(e.version, STATE[e.state], e.reason) for e in events]
        await wait_state(stubs, "slow", 5, "READY")
        response = await stubs.predict.Predict(predict_request("slow", row(0)), timeout=WAIT)
    assert (response.version, added_constant(response, row(0))) == (5, 5.0)
    v5_while_writing = [e for e in during_write if e[0] == 5 and e[1] in ("FAILED", "READY")]
    assert v5_while_writing == [], f"v5 was loaded half-written: {v5_while_writing}"
    assert [e for e in during_write if e[0] == 4] == [(4, "READY", "")], "v4 served throughout"


async def test_version_without_its_ready_marker_is_not_loaded(
    marker_server: ServerProcess,
) -> None:
    repository = marker_server.repository
    async with stubs_of(marker_server) as stubs:
        assert await version_states(stubs, "marked") == {1: ("READY", "")}
        async with watching(stubs, "marked") as events:
            v2 = publish(repository / "marked", 2, adder_bytes(2.0))
            for _ in range(2):
                await scans_passed(stubs, repository, marker=True)
            v2_events = [(e.version, STATE[e.state]) for e in events if e.version == 2]
            assert v2_events == [], "complete files, no marker: never loaded"
            assert 2 not in await version_states(stubs, "marked")

            (v2 / READY_MARKER).touch()
            await wait_state(stubs, "marked", 2, "READY")
            response = await stubs.predict.Predict(predict_request("marked", row(1)), timeout=WAIT)
            assert (response.version, added_constant(response, row(1))) == (2, 2.0)
            v2_events = [(e.version, STATE[e.state]) for e in events if e.version == 2]
            assert v2_events == [(2, "LOADING"), (2, "READY")]


# --- WatchModelStatus ----------------------------------------------------------------------------


def _by_version(events: list[model_status_pb2.ModelStatusEvent]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in events:
        out.setdefault(e.version, []).append(STATE[e.state])
    return out


async def _watch_rollout(server: ServerProcess, model: str) -> list[tuple[int, str, str]]:
    """Publish v2 of `model` (serving v1) and return what the watch streamed meanwhile."""
    async with stubs_of(server) as stubs, watching(stubs, model) as events:
        publish(server.repository / model, 2, adder_bytes(2.0))

        def rolled() -> bool:
            seen = _by_version(events)
            return "READY" in seen.get(2, []) and "UNLOADED" in seen.get(1, [])

        await wait_until(rolled, f"{model}: v2 READY and v1 UNLOADED on the watch")
        assert all(e.time.ToNanoseconds() > 0 for e in events), "each event has its time"
        return [(e.version, STATE[e.state], e.reason) for e in events]


async def test_watch_streams_each_versions_transitions_in_order(
    poll_server: ServerProcess,
) -> None:
    events = await _watch_rollout(poll_server, "watched")
    print("\nwatch:", [(v, s) for v, s, _ in events])
    assert events[0] == (1, "READY", ""), "first the current state"
    by_version: dict[int, list[tuple[str, str]]] = {}
    for version, state, reason in events:
        by_version.setdefault(version, []).append((state, reason))
    assert [s for s, _ in by_version[2]] == ["LOADING", "READY"]
    assert [s for s, _ in by_version[1]] == ["READY", "UNLOADING", "UNLOADED"]
    assert by_version[1][1][1] == "not in version policy", by_version[1]


async def test_watch_shows_the_new_version_ready_before_the_old_one_unloads(
    poll_server: ServerProcess,
) -> None:
    events = await _watch_rollout(poll_server, "watched_order")
    assert [(v, s) for v, s, _ in events] == [
        (1, "READY"),
        (2, "LOADING"),
        (2, "READY"),
        (1, "UNLOADING"),
        (1, "UNLOADED"),
    ]


# --- explicit control ----------------------------------------------------------------------------


async def test_unload_answers_queued_requests_then_refuses_with_not_found(
    explicit_server: ServerProcess,
) -> None:
    """`queued` would hold 3 requests for 10 minutes waiting for a batch of 8; their deadline
    is WAIT, so they are answered OK only if the unload's drain dispatches them at once."""
    xs = [row(i) for i in range(3)]
    labels = {"model": "queued", "version": "1"}
    async with stubs_of(explicit_server) as stubs:
        calls = [
            asyncio.ensure_future(stubs.predict.Predict(predict_request("queued", x), timeout=WAIT))
            for x in xs
        ]
        try:
            await wait_until(
                lambda: metric_value(explicit_server, "inferd_queue_depth", labels) == 3.0,
                "3 requests queued",
            )
            assert not any(c.done() for c in calls), "nothing answered while they wait"
            await stubs.repository.Unload(
                model_repository_pb2.UnloadModelRequest(model="queued"),
                metadata=control_metadata(TOKEN),
                timeout=WAIT,
            )
            responses = await asyncio.gather(*calls)
        finally:
            for c in calls:
                c.cancel()
        for x, response in zip(xs, responses, strict=True):
            assert (response.version, added_constant(response, x)) == (1, 7.0)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.predict.Predict(predict_request("queued", xs[0]), timeout=RPC_TIMEOUT)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
        status = await stubs.status.GetModelStatus(
            model_status_pb2.GetModelStatusRequest(model="queued"), timeout=RPC_TIMEOUT
        )
    (v1,) = status.versions
    assert STATE[v1.state] == "UNLOADED"
    assert v1.statistics.request_success == 3
    assert dict(v1.statistics.batch_sizes) == {3: 1}, "the drain ran them as one batch"


async def test_load_after_models_add_serves_the_new_model(
    explicit_server: ServerProcess, tmp_path: Path
) -> None:
    source = tmp_path / "eleven.onnx"
    source.write_bytes(adder_bytes(11.0))
    added = inferd_cli(
        "models",
        "add",
        str(source),
        "--repository",
        str(explicit_server.repository),
        "--name",
        "added",
    )
    assert added.returncode == 0, added.stderr
    published = explicit_server.repository / "added" / "1"
    assert (published / READY_MARKER).is_file()

    async with AsyncInferClient(explicit_server.target, control_token=TOKEN) as client:
        with pytest.raises(InferError) as not_yet:
            await client.infer("added", {"x": row(0)}, timeout=RPC_TIMEOUT)
        assert not_yet.value.code == grpc.StatusCode.NOT_FOUND, "explicit: not loaded by itself"

        loaded = inferd_cli(
            "models", "load", "added", "--url", explicit_server.target, "--token", TOKEN
        )
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.split() == ["added", "1", "READY"]
        outputs = await client.infer("added", {"x": row(2)}, timeout=RPC_TIMEOUT)
        np.testing.assert_array_equal(outputs["y"], row(2) + 11.0)
        index = {(e.model, e.version): e.state for e in await client.repository_index()}
        assert index[("added", 1)] == "READY"

    listed = inferd_cli("models", "index", "--url", explicit_server.target, "--token", TOKEN)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:3] == ["added", "1", "READY"] for line in listed.stdout.splitlines())


async def test_load_of_a_model_whose_files_are_broken_is_failed_precondition(
    explicit_server: ServerProcess,
) -> None:
    publish(explicit_server.repository / "broken", 1, GARBAGE)
    async with AsyncInferClient(explicit_server.target, control_token=TOKEN) as client:
        with pytest.raises(InferError) as failed:
            await client.load_model("broken", timeout=WAIT)
        assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "v1: loading" in failed.value.details, failed.value.details
        assert "broken/1/model.onnx" in failed.value.details
        assert "INVALID_PROTOBUF" in failed.value.details, "ORT's reason"
        (status,) = await client.status("broken")
        assert (status.version, status.state) == (1, "FAILED")
        assert status.reason and status.reason in failed.value.details

        with pytest.raises(InferError) as absent:
            await client.load_model("not_in_the_repository", timeout=WAIT)
        assert absent.value.code == grpc.StatusCode.NOT_FOUND


async def test_load_and_unload_outside_explicit_mode_are_failed_precondition(
    poll_server: ServerProcess,
) -> None:
    async with AsyncInferClient(poll_server.target, control_token=TOKEN) as client:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferError) as refused:
                await call("watched", timeout=RPC_TIMEOUT)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "explicit" in refused.value.details
        entries = await client.repository_index(timeout=RPC_TIMEOUT)
        assert ("watched", 1) in {(e.model, e.version) for e in entries}, "Index works in poll"


# --- control plane authentication and names ------------------------------------------------------


def _control_calls(
    stubs: Stubs, model: str = "swap"
) -> dict[str, Callable[[tuple[tuple[str, str], ...]], Awaitable[object]]]:
    return {
        "Index": lambda md: stubs.repository.Index(
            model_repository_pb2.RepositoryIndexRequest(), metadata=md, timeout=RPC_TIMEOUT
        ),
        "Load": lambda md: stubs.repository.Load(
            model_repository_pb2.LoadModelRequest(model=model), metadata=md, timeout=RPC_TIMEOUT
        ),
        "Unload": lambda md: stubs.repository.Unload(
            model_repository_pb2.UnloadModelRequest(model=model), metadata=md, timeout=RPC_TIMEOUT
        ),
    }


async def _code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_control_rpcs_without_or_with_a_wrong_token_are_refused(
    poll_server: ServerProcess,
) -> None:
    async with stubs_of(poll_server) as stubs:
        for name, call in _control_calls(stubs).items():
            assert await _code_of(call(())) == grpc.StatusCode.UNAUTHENTICATED, name
            assert (
                await _code_of(call((("authorization", f"Basic {TOKEN}"),)))
                == grpc.StatusCode.UNAUTHENTICATED
            ), name
            assert (
                await _code_of(call(control_metadata("not-the-token")))
                == grpc.StatusCode.PERMISSION_DENIED
            ), name
            assert (
                await _code_of(call(control_metadata(TOKEN[:-1])))
                == grpc.StatusCode.PERMISSION_DENIED
            ), name
        index = _control_calls(stubs)["Index"]
        assert await _code_of(index(control_metadata(TOKEN))) == grpc.StatusCode.OK


async def test_control_rpcs_are_off_on_a_server_without_a_control_token(
    server: ServerProcess,
) -> None:
    async with stubs_of(server) as stubs:
        for name, call in _control_calls(stubs, "mlp").items():
            for metadata in ((), control_metadata(TOKEN)):
                assert await _code_of(call(metadata)) == grpc.StatusCode.FAILED_PRECONDITION, (
                    name,
                    metadata,
                )
        assert await newest_ready(stubs, "mlp") == 1, "nothing was unloaded"


@pytest.mark.parametrize("name", ["../x", "a/b", ""])
async def test_control_rpcs_reject_bad_model_names(
    explicit_server: ServerProcess, name: str
) -> None:
    async with stubs_of(explicit_server) as stubs:
        calls = _control_calls(stubs, name)
        for rpc in ("Load", "Unload"):
            code = await _code_of(calls[rpc](control_metadata(TOKEN)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (rpc, name, code)


# --- memory --------------------------------------------------------------------------------------

CYCLES = 20
BASELINE_CYCLE = 2
# glibc's malloc keeps freed memory in per-thread arenas and raises its mmap threshold after
# the first large free, so with its defaults RSS climbs in ~30 MiB steps (ORT's buffers for a
# batch of 32 CNN images) to a plateau: +15 to +63 MiB over 20 cycles on the 2-core dev box,
# retained by the allocator, not live. Capping the arenas and fixing the mmap threshold makes RSS
# track live memory (and shows unload giving ~30 MiB back); recommended for deployments.
TUNED_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
ALLOCATORS = {
    # allocator: (server environment, RSS growth tolerance in MiB)
    "tuned-malloc": (TUNED_MALLOC, 30.0),
    # What a deployment without MALLOC_* settings sees; only a leak of whole sessions (~30 MiB
    # of buffers per cycle, ~540 MiB in 20) fails this.
    "glibc-defaults": ({}, 256.0),
}


def _rss_summary(label: str, unloaded: list[int], loaded: list[int], tolerance: float) -> str:
    mib = 1024.0
    base, last = unloaded[BASELINE_CYCLE - 1] / mib, unloaded[-1] / mib
    return (
        f"RSS over {CYCLES} cnn load/unload cycles ({label}): after unload at cycle "
        f"{BASELINE_CYCLE} {base:.1f} MiB, at cycle {CYCLES} {last:.1f} MiB (growth "
        f"{last - base:+.1f} MiB, tolerance {tolerance:.0f}; max {max(unloaded) / mib:.1f}); "
        f"loaded {loaded[BASELINE_CYCLE - 1] / mib:.1f} -> {loaded[-1] / mib:.1f} MiB"
    )


@pytest.mark.parametrize("allocator", sorted(ALLOCATORS))
async def test_rss_returns_within_tolerance_after_20_load_unload_cycles(
    start_server: ServerFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    allocator: str,
) -> None:
    """Each cycle: Load cnn (warm-up at 1 and 32 rows), one inference, Unload. The server's
    VmRSS after the unload of cycle 2 (allocators warmed up) is the baseline; after cycle 20
    it must be within the tolerance. Measured on the 2-core dev box: tuned-malloc +1 to +3 MiB
    (about 100 MiB unloaded, 131 MiB loaded); glibc-defaults +15 to +63 MiB (plateau near
    200 MiB), see TUNED_MALLOC."""
    env, tolerance = ALLOCATORS[allocator]
    repository = tmp_path / "cnn_repository"
    write_model(build_cnn(), repository, "cnn", 1, CNN_CONFIG)
    # The arena kept (not the default "off", which returns a run's memory when the run ends),
    # so that a loaded session holds memory for the unload to give back.
    keep = {"INFERD_MODELS__CPU_MEMORY_ARENA": "keep"}
    cnn_server = start_server(repository, env={**EXPLICIT_ENV, **env, **keep})
    pid = cnn_server.process.pid
    image = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    unloaded: list[int] = []
    loaded: list[int] = []
    async with AsyncInferClient(cnn_server.target, control_token=TOKEN) as client:
        await client.unload_model("cnn", timeout=WAIT)
        for _ in range(CYCLES):
            versions = await client.load_model("cnn", timeout=WAIT)
            assert [(v.version, v.state) for v in versions] == [(1, "READY")]
            outputs = await client.infer("cnn", {"image": image}, timeout=WAIT)
            assert outputs["logits"].shape == (1, 100)
            loaded.append(rss_kib(pid))
            await client.unload_model("cnn", timeout=WAIT)
            unloaded.append(rss_kib(pid))
        with pytest.raises(InferError) as gone:
            await client.infer("cnn", {"image": image}, timeout=WAIT)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
    figures = _rss_summary(allocator, unloaded, loaded, tolerance)
    print(f"\n{figures}\nRSS KiB loaded:   {loaded}\nRSS KiB unloaded: {unloaded}")
    add_summary_line(request.config, figures)

    growth = (unloaded[-1] - unloaded[BASELINE_CYCLE - 1]) / 1024.0
    assert growth < tolerance, figures
    if allocator == "tuned-malloc":
        released = sorted(load - unload for load, unload in zip(loaded, unloaded, strict=True))
        assert released[len(released) // 2] > 10 * 1024, (
            f"unload gives the session's memory back (median KiB released: "
            f"{released[len(released) // 2]})"
        )
