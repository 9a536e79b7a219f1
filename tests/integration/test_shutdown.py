"""SIGTERM / SIGINT under load drain cleanly (README "Running"): health goes NOT_SERVING, new
requests get UNAVAILABLE, every accepted request is answered, and the process exits 0 within
the grace period. Each test uses a dedicated server subprocess, since it ends it.

A client here loops over requests until its first UNAVAILABLE (or a request cap); every call
must end OK or UNAVAILABLE: CANCELLED, INTERNAL or a hang would mean the drain dropped a request
that the server had accepted, or reset one in transit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration_support import (
    ServerFactory,
    ServerProcess,
    cnn_input,
    mlp_input,
    predict_request,
)

from inferd_client import AsyncInferClient, InferError
from inferd_wire.proto.inferd.v1 import model_status_pb2, model_status_pb2_grpc, predict_pb2_grpc

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
GRACE_S = 20.0
WAIT = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _client_loop(
    target: str, model: str, inputs: dict[str, np.ndarray], max_requests: int, oks: list[int]
) -> list[grpc.StatusCode]:
    """Requests until the first UNAVAILABLE or `max_requests`; the code of each call."""
    codes: list[grpc.StatusCode] = []
    async with AsyncInferClient(target) as client:
        for _ in range(max_requests):
            try:
                out = await client.infer(model, inputs, timeout=WAIT)
                assert all(len(a) == len(next(iter(inputs.values()))) for a in out.values())
                codes.append(OK)
                oks.append(1)
            except InferError as exc:
                codes.append(exc.code)
                if exc.code == UNAVAILABLE:
                    break
    return codes


async def _watch_health(target: str, saw_serving: asyncio.Event) -> list[object]:
    """Health statuses from a Watch, until NOT_SERVING; then the watch is cancelled at once,
    so it does not hold the server's shutdown (see the xfail test at the end)."""
    seen: list[object] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            async for response in call:
                seen.append(response.status)
                if response.status == SERVING:
                    saw_serving.set()
                if response.status == NOT_SERVING:
                    break
        except grpc.aio.AioRpcError as exc:
            seen.append(exc.code())
        finally:
            call.cancel()
    return seen


async def _drain_under_load(
    server: ServerProcess,
    sig: int,
    clients: int,
    model: str,
    make_inputs: Callable[[np.random.Generator], dict[str, np.ndarray]],
    max_requests: int,
) -> None:
    rng = np.random.default_rng(110)
    oks: list[int] = []
    saw_serving = asyncio.Event()
    watcher = asyncio.create_task(_watch_health(server.target, saw_serving))
    await asyncio.wait_for(saw_serving.wait(), WAIT)
    loops = [
        asyncio.create_task(_client_loop(server.target, model, make_inputs(rng), max_requests, oks))
        for _ in range(clients)
    ]
    # Signal after ~1 s of load, or sooner once the clients are a quarter through their
    # requests (a fast machine must still be under load); a slow start waits for a first OK.
    started = time.monotonic()
    while not (oks and time.monotonic() - started >= 1.0):
        if len(oks) >= clients * max_requests // 4 or time.monotonic() - started > WAIT:
            break
        await asyncio.sleep(0.05)
    ok_before_signal = len(oks)

    signalled = time.monotonic()
    server.send_signal(sig)
    try:
        rc = await asyncio.to_thread(server.process.wait, GRACE_S + 10)
    except Exception as exc:
        raise AssertionError(
            f"server did not exit after {GRACE_S + 10} s\n{server.describe()}"
        ) from exc
    exit_s = time.monotonic() - signalled
    codes = await asyncio.wait_for(asyncio.gather(*loops), WAIT)
    health = await asyncio.wait_for(watcher, WAIT)

    tally: dict[str, int] = {}
    for per_client in codes:
        for code in per_client:
            tally[code.name] = tally.get(code.name, 0) + 1
    report = (
        f"{signal.Signals(sig).name}: exit {rc} after {exit_s:.2f} s; calls {tally}; "
        f"{ok_before_signal} OK before the signal; health seen {health}\n{server.describe()}"
    )
    print("\n" + report.splitlines()[0])
    assert rc == 0, report
    assert exit_s < GRACE_S + 1, report
    assert set(tally) <= {"OK", "UNAVAILABLE"}, report
    assert ok_before_signal >= 1, report
    for per_client in codes:
        assert per_client[-1] == UNAVAILABLE or len(per_client) == max_requests, report
    assert "UNAVAILABLE" in tally, f"the load ended before the signal: {report}"
    assert health[0] == SERVING and NOT_SERVING in health, report
    assert "inferd stopped" in server.log_text(), report


async def test_sigterm_under_load_drains_and_exits_zero(
    start_server: ServerFactory, demo_repository: Path
):
    server = start_server(demo_repository, env={"INFERD_GRACE_PERIOD_S": str(GRACE_S)})
    await _drain_under_load(
        server, signal.SIGTERM, 16, "cnn", lambda rng: cnn_input(rng, 4), max_requests=200
    )


async def test_sigint_under_load_drains_and_exits_zero(
    start_server: ServerFactory, demo_repository: Path
):
    server = start_server(demo_repository, env={"INFERD_GRACE_PERIOD_S": str(GRACE_S)})
    await _drain_under_load(
        server, signal.SIGINT, 4, "mlp", lambda rng: mlp_input(rng, 2), max_requests=1000
    )


async def test_clients_that_keep_retrying_do_not_stretch_shutdown_past_the_grace_period(
    start_server: ServerFactory, demo_repository: Path
):
    """Clients that retry UNAVAILABLE at once never go quiet: the drain, the quiesce and the
    transport's stop must all fit in the grace period anyway. Calls that reach the server but no
    handler at the instant the transport stops end CANCELLED (grpc/grpc#41785): few; nothing
    may end UNKNOWN or INTERNAL."""
    grace = 3.0
    server = start_server(demo_repository, env={"INFERD_GRACE_PERIOD_S": str(grace)})
    inputs = mlp_input(np.random.default_rng(7), 1)
    exited = asyncio.Event()
    tally: dict[str, int] = {}

    loaded = asyncio.Event()

    async def retry_forever() -> None:
        # retries=0: every call is counted here, and retried at once by this loop.
        async with AsyncInferClient(server.target, retries=0) as client:
            while not exited.is_set():
                try:
                    await client.infer("mlp", inputs, timeout=WAIT)
                    code = "OK"
                except InferError as exc:
                    code = exc.code.name
                tally[code] = tally.get(code, 0) + 1
                if tally.get("OK", 0) >= 50:
                    loaded.set()

    loops = [asyncio.create_task(retry_forever()) for _ in range(4)]
    await asyncio.wait_for(loaded.wait(), WAIT)
    signalled = time.monotonic()
    server.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(server.process.wait, grace + 10)
    exit_s = time.monotonic() - signalled
    exited.set()
    await asyncio.wait_for(asyncio.gather(*loops), WAIT)
    report = f"exit {rc} after {exit_s:.2f} s (grace {grace} s); calls {tally}"
    print("\n" + report)
    assert rc == 0, f"{report}\n{server.describe()}"
    # The server's own account of its stop, from SIGTERM handling to the transport stopped,
    # must fit the grace period (before: 30.5-30.8 s for 30 s); the process's exit
    # (interpreter teardown) comes on top, so it gets a looser bound.
    stopped = re.search(r"inferd stopped ([\d.]+) s after the drain began", server.log_text())
    assert stopped is not None, server.describe()
    assert float(stopped.group(1)) <= grace + 0.05, f"{report}\n{server.describe()}"
    assert exit_s < grace + 2.0, f"{report}\n{server.describe()}"
    assert set(tally) <= {"OK", "UNAVAILABLE", "CANCELLED"}, report
    assert tally.get("UNAVAILABLE", 0) > 0, report
    assert tally.get("CANCELLED", 0) <= 16, report


def test_idle_server_exits_zero_on_sigterm(start_server: ServerFactory, demo_repository: Path):
    server = start_server(demo_repository)
    rc = server.stop(signal.SIGTERM, timeout=GRACE_S + 10)
    assert rc == 0, server.describe()
    assert "inferd stopped" in server.log_text(), server.describe()


# --- open streams -------------------------------------------------------------------------------

STREAM_GRACE_S = 10.0


def _open_health_watch(channel: grpc.Channel, stack: contextlib.ExitStack) -> Iterator[object]:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    stack.callback(call.cancel)
    assert next(call).status == SERVING  # established
    return call


def _open_model_status_watch(
    channel: grpc.Channel, stack: contextlib.ExitStack
) -> Iterator[object]:
    call = model_status_pb2_grpc.ModelStatusStub(channel).WatchModelStatus(
        model_status_pb2.WatchModelStatusRequest(model="mlp")
    )
    stack.callback(call.cancel)
    assert next(call).state == model_status_pb2.MODEL_STATE_READY  # established
    return call


def _open_idle_predict_stream(
    channel: grpc.Channel, stack: contextlib.ExitStack
) -> Iterator[object]:
    """A PredictStream that had one request answered and now waits for the next."""
    pending: queue.Queue = queue.Queue()

    def requests():
        while (item := pending.get()) is not None:
            yield item

    call = predict_pb2_grpc.PredictStub(channel).PredictStream(requests())
    stack.callback(call.cancel)
    stack.callback(pending.put, None)
    pending.put(predict_request("mlp", mlp_input(np.random.default_rng(111), 1), id="first"))
    assert next(call).WhichOneof("result") == "response"
    return call


OPENERS = {
    "health Watch": _open_health_watch,
    "WatchModelStatus": _open_model_status_watch,
    "idle PredictStream": _open_idle_predict_stream,
}


def _rest_of(call: Iterator[object]) -> str:
    """How an open stream ended: what it still delivered, then its status."""
    seen = []
    try:
        for message in call:
            seen.append(type(message).__name__)
    except grpc.RpcError as exc:
        return f"{len(seen)} more, then {exc.code().name}"
    return f"{len(seen)} more, then OK"


def test_open_streams_do_not_hold_shutdown_for_the_grace_period(
    start_server: ServerFactory, demo_repository: Path
):
    """A health Watch, a WatchModelStatus and an idle PredictStream have nothing to drain: the
    server must not wait out its grace period for their clients. One server per kind of
    stream, all signalled at once (one grace period in all, should it regress)."""
    env = {"INFERD_GRACE_PERIOD_S": str(STREAM_GRACE_S)}
    servers = {kind: start_server(demo_repository, env=env) for kind in OPENERS}
    with contextlib.ExitStack() as stack:
        calls = {}
        for kind, server in servers.items():
            channel = stack.enter_context(grpc.insecure_channel(server.target))
            calls[kind] = OPENERS[kind](channel, stack)
        signalled = time.monotonic()
        for server in servers.values():
            server.send_signal(signal.SIGTERM)
        exits = {}
        for kind, server in servers.items():
            # wait, not stop(): a second SIGTERM while the process exits could kill it.
            rc = server.process.wait(timeout=STREAM_GRACE_S + 10)
            exits[kind] = (rc, round(time.monotonic() - signalled, 2))
        ends = {kind: _rest_of(call) for kind, call in calls.items()}
    report = f"(exit code, s after SIGTERM) {exits}; streams ended: {ends}"
    print("\n" + report)
    assert all(rc == 0 for rc, _ in exits.values()), report
    # Draining takes about a second here (the server then gives open streams 1 s); the bug
    # this pins waited out all 10 s.
    assert all(s < STREAM_GRACE_S / 2 for _, s in exits.values()), report
    # A client's open stream must end with a status it can act on: a clean end, or the
    # retryable UNAVAILABLE; never CANCELLED, INTERNAL or UNKNOWN.
    assert all(e.endswith(("OK", "UNAVAILABLE")) for e in ends.values()), report
