"""One InferClient over several servers: calls are spread round-robin, and when one server
drains (its graceful `stop()`: health NOT_SERVING, new requests UNAVAILABLE) no call fails,
because the client stops picking it and retries what it refused on another."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from inprocess_server import ServerThread
from integration_support import ServerFactory

from inferd.demo_models import MLP_CONFIG, build_mlp, write_model
from inferd_client import InferClient, InferError
from inferd_wire.proto.inferd.v1 import predict_pb2, predict_pb2_grpc

CLIENTS = 8
REPLICAS = 3
WAIT = 30.0


@pytest.fixture(scope="module")
def mlp_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("mlp")
    write_model(build_mlp(), repository, "mlp", config_toml=MLP_CONFIG)
    return repository


def served(target: str) -> int:
    """Requests the server at `target` has answered OK, from its ModelStatus counters."""
    with InferClient(target, retries=0) as client:
        return sum(v.statistics["request_success"] for v in client.status("mlp", timeout=10))


def refused_by(replica: ServerThread) -> float:
    """Requests the server answered UNAVAILABLE (while draining)."""
    assert replica.server is not None
    return sum(
        sample.value
        for family in replica.server.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "inferd_requests_total" and sample.labels.get("code") == "UNAVAILABLE"
    )


class Load:
    """CLIENTS threads calling Predict in a loop through one client, until stopped."""

    def __init__(self, client: InferClient) -> None:
        self.client = client
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(seed,), daemon=True)
            for seed in range(CLIENTS)
        ]

    def _loop(self, seed: int) -> None:
        x = {"input": np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)}
        while not self._stop.is_set():
            try:
                self.client.infer("mlp", x, timeout=WAIT)
                outcome = "OK"
            except InferError as exc:
                outcome = exc.code.name
                with self._lock:
                    self.errors.append(f"{exc.code.name}: {exc.details}")
            with self._lock:
                self.outcomes[outcome] += 1

    def ok(self) -> int:
        with self._lock:
            return self.outcomes["OK"]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what} after {WAIT} s"
        time.sleep(0.05)


def test_calls_over_three_servers_all_succeed_while_one_drains(mlp_repository: Path) -> None:
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(ServerThread(mlp_repository)) for _ in range(REPLICAS)]
        targets = [r.target for r in replicas]
        client = stack.enter_context(InferClient(targets))
        with Load(client) as load:
            wait_for(lambda: all(served(t) >= 20 for t in targets), "requests on every server")
            before = [served(t) for t in targets]
            ok_at_stop = load.ok()
            started = time.monotonic()
            replicas[1].stop(grace=10)  # returns once drained and closed
            drain_s = time.monotonic() - started
            wait_for(lambda: load.ok() >= ok_at_stop + 200, "calls after the stop")
            after = [served(targets[0]), served(targets[2])]
        refused = refused_by(replicas[1])
    print(
        f"\nper server before the stop {before}, after {after} (the survivors); calls "
        f"{dict(load.outcomes)}; refused by the draining server (then retried) {refused:.0f}; "
        f"the stop took {drain_s:.2f} s"
    )
    assert all(n >= 20 for n in before), before
    assert load.errors == [], f"{dict(load.outcomes)}: {load.errors[:5]}"
    assert after[0] > before[0] and after[1] > before[2], (before, after)


class FakePredict(predict_pb2_grpc.PredictServicer):
    """Answers every Predict with no outputs, or refuses it UNAVAILABLE; counts attempts."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.attempts = 0

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        self.attempts += 1
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "refusing")
        return predict_pb2.PredictResponse(model=request.model)


@contextlib.contextmanager
def fake_server(servicer: FakePredict) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    predict_pb2_grpc.add_PredictServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("retries", [2, 0])
def test_a_refused_call_is_retried_on_the_next_server(retries: int) -> None:
    """Two servers whose health says nothing (they have no health service, which counts as
    serving), one refusing everything: one caller's calls alternate between them, so each
    refused attempt is retried on the other, and all succeed. Without retries, every call
    that went to the refusing one fails."""
    refusing, serving = FakePredict(refuse=True), FakePredict(refuse=False)
    calls = 20
    with (
        fake_server(refusing) as a,
        fake_server(serving) as b,
        InferClient([a, b], retries=retries) as client,
    ):
        failed = 0
        for _ in range(calls):
            try:
                client.infer("m", {}, timeout=WAIT)
            except InferError as exc:
                assert exc.code.name == "UNAVAILABLE"
                failed += 1
    assert refusing.attempts >= calls // 2 - 1, (refusing.attempts, serving.attempts)
    if retries:
        assert failed == 0 and serving.attempts == calls
    else:
        assert failed == refusing.attempts and serving.attempts == calls - failed


def test_a_server_address_list_must_be_ip_literals() -> None:
    with pytest.raises(ValueError, match="dns:///"):
        InferClient(["localhost:8001", "localhost:8002"])


def test_replicas_that_drain_or_die_mid_run_cost_no_call(
    start_server: ServerFactory, mlp_repository: Path
) -> None:
    """Three replicas in processes of their own, 8 clients calling through one InferClient
    with the three addresses; mid-run one replica gets SIGTERM (it drains) and another SIGKILL
    (it vanishes, calls in flight on it included). Every call ends OK, or with a precise error
    (never UNKNOWN or INTERNAL), and none hangs; the survivor serves the rest."""
    replicas = [start_server(mlp_repository) for _ in range(REPLICAS)]
    targets = [f"127.0.0.1:{r.port}" for r in replicas]
    with InferClient(targets) as client, Load(client) as load:
        wait_for(lambda: load.ok() >= 300, "300 OK calls before the signals")
        before = load.ok()
        replicas[0].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        replicas[1].process.kill()
        replicas[0].process.wait(WAIT)
        replicas[1].process.wait(WAIT)
        wait_for(lambda: load.ok() >= before + 300, "300 OK calls after the signals")
    report = f"outcomes {dict(load.outcomes)}; first errors {load.errors[:5]}"
    print(
        f"\nthree replicas, one SIGTERM and one SIGKILL mid-run under {CLIENTS} clients: {report}"
    )
    assert set(load.outcomes) <= {"OK", "UNAVAILABLE"}, report
    # Retries carry nearly every call of a replica that went away to another one.
    assert load.outcomes["UNAVAILABLE"] <= 16, report
    with InferClient(targets[2], retries=0) as survivor:
        assert sum(v.statistics["request_success"] for v in survivor.status("mlp")) >= 300
