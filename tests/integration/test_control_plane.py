"""Repository hygiene and the control plane against real `inferd serve` subprocesses over
loopback gRPC: directories that are not versions (at start and appearing while polling) break
no other model; every repository RPC of both protocols needs the control token; a retired
version leaves ListModels and /metrics after `retired_retention_s`; a READY version's series
exist at zero before its first request; FAILED reasons name paths relative to the repository.

Every model computes y = x + c (FP32 [batch, 4]). Waits poll with a bound (WAIT)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from integration_support import ServerFactory, ServerProcess, wait_until

from inferd.demo_models import build_adder
from inferd_wire.codec import to_wire
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2,
    model_repository_pb2_grpc,
    model_status_pb2,
    model_status_pb2_grpc,
    predict_pb2,
    predict_pb2_grpc,
    tensor_pb2,
)
from inferd_wire.proto.inference import grpc_service_pb2 as oip_pb2
from inferd_wire.proto.inference import grpc_service_pb2_grpc as oip_grpc

TOKEN = "control-plane-test-token"
POLL_S = 0.2
RETENTION_S = 0.5
WAIT = 30.0
RPC_TIMEOUT = 10.0
POLL_ENV = {
    "INFERD_MODEL_CONTROL": "poll",
    "INFERD_POLL_INTERVAL_S": str(POLL_S),
    "INFERD_SETTLE_S": "0",
    "INFERD_CONTROL_TOKEN": TOKEN,
    "INFERD_RETIRED_RETENTION_S": str(RETENTION_S),
}
STATE = {v: k.removeprefix("MODEL_STATE_") for k, v in model_status_pb2.ModelState.items()}


def adder_bytes(c: float) -> bytes:
    return build_adder(c).SerializeToString()


GARBAGE = b"\x08\x07 this is not an ONNX model \xff\xfe" * 8
# Version directory names a scan must skip (str.isdigit() takes the first; int64 not the second).
ODD_VERSIONS = ("²", "99999999999999999999", "1.5")


def publish(model_dir: Path, version: str, content: bytes) -> Path:
    """Write into a hidden staging directory, then rename it into place (atomic for a poller)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".publish-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(content)
    target = model_dir / version
    os.rename(staging, target)
    return target


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.predictor = predict_pb2_grpc.PredictStub(channel)
        self.status = model_status_pb2_grpc.ModelStatusStub(channel)
        self.repository = model_repository_pb2_grpc.ModelRepositoryStub(channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(channel)

    async def versions(self, model: str) -> dict[int, tuple[str, str]]:
        """version -> (state, reason); {} while the server does not know the model."""
        try:
            response = await self.status.GetModelStatus(
                model_status_pb2.GetModelStatusRequest(model=model), timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return {}
            raise
        return {v.version: (STATE[v.state], v.reason) for v in response.versions}

    async def listed(self) -> dict[str, dict[int, str]]:
        response = await self.status.ListModels(
            model_status_pb2.ListModelsRequest(), timeout=RPC_TIMEOUT
        )
        return {m.name: {v.version: STATE[v.state] for v in m.versions} for m in response.models}

    async def predict(self, model: str, version: int | None = None) -> int:
        """Predict on `model` (its newest READY version, or `version`): who answered."""
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        datatype, shape, contents = to_wire(x)
        request = predict_pb2.PredictRequest(
            model=model,
            inputs=[tensor_pb2.Tensor(name="x", datatype=datatype, shape=shape, contents=contents)],
        )
        if version is not None:
            request.version = version
        response = await self.predictor.Predict(request, timeout=RPC_TIMEOUT)
        return response.version

    async def oip_index(self, token: str | None = TOKEN) -> dict[tuple[str, str], str]:
        response = await self.oip.RepositoryIndex(
            oip_pb2.RepositoryIndexRequest(), metadata=bearer(token), timeout=RPC_TIMEOUT
        )
        return {(m.name, m.version): m.reason or m.state for m in response.models}


@contextlib.asynccontextmanager
async def stubs_of(server: ServerProcess) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield Stubs(channel)


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def metrics_text(server: ServerProcess) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
    return text


def series(text: str, name: str, **labels: str) -> dict[str, float]:
    """Lines of metric `name` carrying every label given: {label block: value}."""
    found = {}
    for match in re.finditer(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", text, re.M):
        block = match.group(1)
        if all(f'{k}="{v}"' in block for k, v in labels.items()):
            found[block] = float(match.group(2))
    return found


async def scrape(server: ServerProcess) -> str:
    return await asyncio.to_thread(metrics_text, server)


# --- servers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def poll_server(
    module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """Poll mode, control token, retention RETENTION_S; a repository that holds, from the
    start, directories a scan must skip."""
    repository = tmp_path_factory.mktemp("control_plane_repository")
    for name in ("steady", "retiring", "untouched"):
        publish(repository / name, "1", adder_bytes(1.0))
    for odd in ODD_VERSIONS:
        publish(repository / "steady", odd, adder_bytes(9.0))
    publish(repository / "bad name", "1", adder_bytes(1.0))
    os.mkdir(os.path.join(os.fsencode(repository), b"\xff\xfe"))
    return module_server_factory(repository, env=POLL_ENV)


# --- tests (in order: the first needs a server no request has reached yet) ---------------------


async def test_a_ready_versions_series_exist_at_zero_before_any_request(
    poll_server: ServerProcess,
) -> None:
    text = await scrape(poll_server)
    mv = {"model": "untouched", "version": "1"}
    for protocol in ("native", "oip"):
        ok = series(text, "inferd_requests_total", **mv, protocol=protocol, code="OK")
        assert list(ok.values()) == [0.0], protocol
        count = series(text, "inferd_request_duration_seconds_count", **mv, protocol=protocol)
        assert list(count.values()) == [0.0], protocol
    for name in (
        "inferd_queue_duration_seconds_count",
        "inferd_compute_duration_seconds_count",
        "inferd_batch_size_count",
        "inferd_inference_count_total",
        "inferd_execution_count_total",
        "inferd_batch_failures_total",
    ):
        assert list(series(text, name, **mv).values()) == [0.0], name
    assert series(text, "inferd_rejections_total", **mv, reason="queue_full"), "rejections too"


async def test_a_fresh_start_with_odd_directories_serves_every_model(
    poll_server: ServerProcess,
) -> None:
    async with stubs_of(poll_server) as stubs:
        listed = await stubs.listed()
        assert sorted(listed) == ["retiring", "steady", "untouched"]
        assert await stubs.versions("steady") == {1: ("READY", "")}
        assert await stubs.predict("steady") == 1
    text = await scrape(poll_server)
    problems = series(text, "inferd_repository_problems")
    for path, kind in (
        *((f"steady/{odd}", "not_a_version") for odd in ODD_VERSIONS),
        ("bad name", "invalid_name"),
        ("\\\\xff\\\\xfe", "invalid_name"),  # \xff\xfe, escaped once more in the text format
    ):
        matching = series(text, "inferd_repository_problems", path=path, problem=kind)
        assert list(matching.values()) == [1.0], (path, kind, problems)
    log = poll_server.log_text()
    assert log.count("'steady/\\u00b2' skipped") + log.count("'steady/²' skipped") == 1, (
        "logged once, not every poll"
    )


async def test_odd_directories_appearing_while_polling_break_nothing(
    poll_server: ServerProcess,
) -> None:
    repository = poll_server.repository
    for odd in ("12345678901234567890", "-1", "\u0663"):
        publish(repository / "steady", odd, adder_bytes(9.0))
    (repository / "steady" / "7").write_bytes(adder_bytes(9.0))  # a file, not a directory
    os.mkdir(os.path.join(os.fsencode(repository), b"new\xffmodel"))
    publish(repository / "late", "1", adder_bytes(1.0))  # polling goes on for new models

    async with stubs_of(poll_server) as stubs:

        async def late_ready() -> bool:
            return (await stubs.versions("late")).get(1, ("", ""))[0] == "READY"

        await wait_until(late_ready, "the model published after the odd directories is READY")
        text = await scrape(poll_server)
        for path in ("steady/12345678901234567890", "steady/-1", "steady/\u0663", "steady/7"):
            assert series(text, "inferd_repository_problems", path=path), path
        assert series(text, "inferd_repository_problems", path="new\\\\xffmodel")

        listed = await stubs.listed()
        assert listed["steady"] == {1: "READY"}
        assert await stubs.versions("steady") == {1: ("READY", "")}
        assert await stubs.predict("steady") == 1
        assert await stubs.predict("late") == 1
        index = await stubs.oip_index()
        assert ("steady", "1") in index and ("late", "1") in index
        assert {name for name, _ in index} <= {"steady", "late", "retiring", "untouched"}


async def test_every_repository_rpc_needs_the_control_token(poll_server: ServerProcess) -> None:
    async with stubs_of(poll_server) as stubs:
        calls: dict[str, Callable[[tuple[tuple[str, str], ...]], Awaitable[object]]] = {
            "oip RepositoryIndex": lambda md: stubs.oip.RepositoryIndex(
                oip_pb2.RepositoryIndexRequest(), metadata=md, timeout=RPC_TIMEOUT
            ),
            "oip RepositoryModelLoad": lambda md: stubs.oip.RepositoryModelLoad(
                oip_pb2.RepositoryModelLoadRequest(model_name="steady"),
                metadata=md,
                timeout=RPC_TIMEOUT,
            ),
            "native Index": lambda md: stubs.repository.Index(
                model_repository_pb2.RepositoryIndexRequest(), metadata=md, timeout=RPC_TIMEOUT
            ),
        }
        for name, call in calls.items():
            assert await code_of(call(())) == grpc.StatusCode.UNAUTHENTICATED, name
            basic = (("authorization", f"Basic {TOKEN}"),)
            assert await code_of(call(basic)) == grpc.StatusCode.UNAUTHENTICATED, name
            wrong = bearer("not-the-token")
            assert await code_of(call(wrong)) == grpc.StatusCode.PERMISSION_DENIED, name
        for name in ("oip RepositoryIndex", "native Index"):
            assert await code_of(calls[name](bearer(TOKEN))) == grpc.StatusCode.OK, name
        index = await stubs.oip_index(TOKEN)
        assert index[("steady", "1")] == "READY"


async def test_repository_index_is_off_like_the_other_control_rpcs_without_a_token(
    server: ServerProcess,
) -> None:
    async with stubs_of(server) as stubs:
        for metadata in ((), bearer(TOKEN)):
            code = await code_of(
                stubs.oip.RepositoryIndex(
                    oip_pb2.RepositoryIndexRequest(), metadata=metadata, timeout=RPC_TIMEOUT
                )
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION, metadata


async def test_a_retired_version_leaves_status_and_metrics_after_the_retention(
    poll_server: ServerProcess,
) -> None:
    repository = poll_server.repository
    async with stubs_of(poll_server) as stubs:
        assert await stubs.predict("retiring", 1) == 1
        text = await scrape(poll_server)
        assert series(text, "inferd_requests_total", model="retiring", version="1", code="OK")

        publish(repository / "retiring", "2", adder_bytes(1.0))

        async def v1_forgotten() -> bool:
            return await stubs.versions("retiring") == {2: ("READY", "")}

        await wait_until(v1_forgotten, "v1 replaced by v2, then forgotten")
        assert (await stubs.listed())["retiring"] == {2: "READY"}
        index = await stubs.oip_index()
        assert ("retiring", "1") not in index and ("retiring", "2") in index
        assert await code_of(stubs.predict("retiring", 1)) == grpc.StatusCode.NOT_FOUND

        text = await scrape(poll_server)
        gone = [
            line
            for line in text.splitlines()
            if 'model="retiring"' in line and 'version="1"' in line
        ]
        assert gone == [], gone[:5]
        assert series(text, "inferd_requests_total", model="retiring", version="2", code="OK")


async def test_failed_reasons_name_paths_relative_to_the_repository(
    poll_server: ServerProcess,
) -> None:
    repository = poll_server.repository
    publish(repository / "broken", "1", GARBAGE)
    warm = publish(repository / ".warm-staging", "1", adder_bytes(1.0)).parent
    (warm / "warmup").mkdir()
    np.savez(warm / "warmup" / "wrong.npz", image=np.zeros((1, 4), np.float32))
    os.rename(warm, repository / "warm")
    async with stubs_of(poll_server) as stubs:

        async def both_failed() -> bool:
            states = [(await stubs.versions(m)).get(1, ("", ""))[0] for m in ("broken", "warm")]
            return states == ["FAILED", "FAILED"]

        await wait_until(both_failed, "broken and warm FAILED")
        broken = (await stubs.versions("broken"))[1][1]
        warm_reason = (await stubs.versions("warm"))[1][1]
        index = await stubs.oip_index()
    assert broken.startswith("loading broken/1/model.onnx failed: "), broken
    assert "INVALID_PROTOBUF" in broken, "ONNX Runtime's own words, its path cut too"
    assert warm_reason.startswith("warm/warmup/wrong.npz: holds arrays"), warm_reason
    assert index[("broken", "1")] == broken
    for reason in (broken, warm_reason):
        assert str(repository) not in reason


async def test_explicit_load_of_a_broken_config_says_why_without_server_paths(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "repository"
    publish(repository / "fine", "1", adder_bytes(1.0))
    publish(repository / "fine", "²", adder_bytes(1.0))  # a fresh start in explicit mode too
    server = start_server(
        repository, env={"INFERD_MODEL_CONTROL": "explicit", "INFERD_CONTROL_TOKEN": TOKEN}
    )
    publish(repository / "configured", "1", adder_bytes(1.0))
    (repository / "configured" / "config.toml").write_text("max_batch_size = [\n")
    async with stubs_of(server) as stubs:
        assert await stubs.predict("fine") == 1
        for load in (
            stubs.repository.Load(
                model_repository_pb2.LoadModelRequest(model="configured"),
                metadata=bearer(TOKEN),
                timeout=WAIT,
            ),
            stubs.oip.RepositoryModelLoad(
                oip_pb2.RepositoryModelLoadRequest(model_name="configured"),
                metadata=bearer(TOKEN),
                timeout=WAIT,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await load
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            details = refused.value.details() or ""
            assert "configured/config.toml: not valid TOML" in details, details
            assert str(repository) not in details and str(tmp_path) not in details
