"""Scenarios 1-5: inferd on its own — batching gain, efficiency against the in-process ceiling,
added latency, native API against the Open Inference Protocol, peak RPC rate."""

from __future__ import annotations

from dataclasses import replace

from inferd.loadtest.bench.scenario import (
    BenchContext,
    Scenario,
    ScenarioPending,
    ScenarioResult,
    figure_links,
    fmt,
    markdown_table,
    measure,
    p50_ms,
    p99_ms,
    session_tables,
)
from inferd.loadtest.inputs import parse_shapes
from inferd.loadtest.levels import LoadLevel, closed_levels
from inferd.loadtest.runner import LevelResult
from inferd.loadtest.session import Workload
from inferd.loadtest.targets.oip import OipDriver, stubs_present
from inferd.loadtest.targets.target import TargetError, TargetSpec


def _levels(values: list[int]) -> list[LoadLevel]:
    return closed_levels(",".join(str(v) for v in values))


def _native(ctx: BenchContext, model: str, label: str = "") -> TargetSpec:
    return TargetSpec("native", ctx.inferd.target, model, label=label or f"inferd/{model}")


def _inprocess(
    ctx: BenchContext, model: str, label: str = "", client_batch: int | None = None
) -> TargetSpec:
    return TargetSpec(
        "inprocess",
        str(ctx.repository),
        model,
        label=label or f"in-process/{model}",
        client_batch=client_batch,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def slot_busy(result: LevelResult) -> str:
    """Share of the measured time the model's execution slot spent executing (inferd counts,
    per request, the execution time of its batch: batches/s x mean batch time)."""
    split = result.server
    if split is None or not result.measured.duration:
        return "n/a"
    busy = split.executions / result.measured.duration * split.mean_compute_ms / 1e3
    return f"{busy:.0%}"


def batching_gain(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    unbatched = scenario.params["unbatched_model"]
    concurrency = int(scenario.params["concurrency"])
    off = _native(ctx, unbatched, "batching off")
    on = _native(ctx, model, "batching on")
    session = measure(ctx, scenario, model, [off, on], _levels([concurrency]))
    base, batched = (t.levels[0] for t in session.targets)
    gain = batched.requests_per_s / base.requests_per_s if base.requests_per_s else float("nan")
    tail = p99_ms(session, 1) / p99_ms(session, 0)
    server = batched.server
    return ScenarioResult(
        scenario,
        headline=[
            (f"Batching gain ({model}, c={concurrency}): req/s on ÷ off", f"{fmt(gain)}x"),
            ("  p99 latency on ÷ off", f"{fmt(tail)}x"),
        ],
        body=[
            f"`{model}` with its config (max_batch_size 64, max_queue_delay_us 200) against "
            f"`{unbatched}`, the same model with max_batch_size 1, on the same server process, "
            f"closed loop c={concurrency}, one row per request, interleaved (rounds: "
            f"{scenario.rounds}).",
            session_tables(session),
            f"With batching on, the server executed batches of "
            f"{fmt(server.mean_batch_size if server else None)} rows on average. Its one "
            f"execution slot was busy running the model {slot_busy(base)} of the time with "
            f"batching off and {slot_busy(batched)} with it on: where that is far below 100 %, "
            "requests wait on per-request handling (gRPC, the event loop), not on the model, "
            "and fewer, larger executions cannot raise throughput.",
            figure_links(ctx, scenario, model),
        ],
    )


def efficiency(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    concurrency = int(scenario.params["concurrency"])
    probe_plan = replace(scenario.plan, duration_s=float(scenario.params["probe_s"]))
    probe_scenario = replace(scenario, plan=probe_plan)
    probe = measure(ctx, probe_scenario, "probe", [_native(ctx, model)], _levels([concurrency]))
    split = probe.targets[0].levels[0].server
    if split is None or not split.executions:
        raise ScenarioPending("the server reported no executed batches in the probe run")
    batch = max(1, round(split.mean_batch_size))
    ceiling = _inprocess(ctx, model, f"in-process, batch {batch}", client_batch=batch)
    served = _native(ctx, model, "served")
    # The ceiling runs batches back to back from one caller (c=1): more callers than session
    # threads only queue in front of it, and measured slower. So the two cannot share a
    # session's levels; they alternate instead, `rounds` times each.
    runs: list[list[str]] = []
    served_rows: list[float] = []
    ceiling_rows: list[float] = []
    served_compute: list[float] = []
    ceiling_p50: list[float] = []
    for index in range(scenario.rounds):
        for spec, level, rows in ((served, concurrency, served_rows), (ceiling, 1, ceiling_rows)):
            name = f"{model}-{'served' if spec is served else 'inprocess'}{index + 1}"
            session = measure(ctx, scenario, name, [spec], _levels([level]), rounds=1)
            result = session.targets[0].levels[0]
            rows.append(result.rows_per_s)
            if result.server is not None:
                served_compute.append(result.server.mean_compute_ms)
            elif spec is ceiling:
                ceiling_p50.append(p50_ms(session, 0))
            runs.append(
                [
                    spec.label,
                    result.level.label + ("" if result.stable else " *"),
                    fmt(result.rows_per_s, 0),
                    fmt(p50_ms(session, 0), 3),
                    fmt(p99_ms(session, 0), 3),
                    fmt(result.server.mean_batch_size if result.server else None),
                    fmt(result.server.mean_compute_ms if result.server else None, 3),
                ]
            )
    ratio = (sum(served_rows) / len(served_rows)) / (sum(ceiling_rows) / len(ceiling_rows))
    return ScenarioResult(
        scenario,
        headline=[
            (
                f"Efficiency ({model}, c={concurrency}): served rows/s ÷ in-process at batch "
                f"{batch}",
                f"{fmt(ratio)} ({ratio:.0%})",
            )
        ],
        body=[
            f"A probe run (`{model}`, closed loop c={concurrency}, {probe_plan.duration_s:.0f} s) "
            f"found the server executing batches of {fmt(split.mean_batch_size)} rows on "
            f"average. The ceiling is ONNX Runtime in the load generator's own process running "
            f"batches of {batch} rows back to back (one caller, one session, like one inferd "
            f"execution slot). Served (c={concurrency}, one row per request) and ceiling runs "
            f"alternated {scenario.rounds} times; the ratio is of their mean rows/s.",
            markdown_table(
                (
                    "target",
                    "level",
                    "rows/s",
                    "p50 ms",
                    "p99 ms",
                    "server batch",
                    "server compute ms",
                ),
                runs,
            ),
            f"Inside the server one batch took {fmt(_mean(served_compute), 3)} ms to execute "
            f"on average; the same batch size in-process took {fmt(_mean(ceiling_p50), 3)} ms "
            "(p50). Likely, on two cores, the server's gRPC and event-loop threads, and the load "
            "generator, take CPU from ONNX Runtime's own threads.",
            figure_links(ctx, scenario, f"{model}-served1"),
            figure_links(ctx, scenario, f"{model}-inprocess1"),
        ],
    )


def added_latency(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    shapes = scenario.params.get("shapes", {})
    rows: list[list[str]] = []
    headline: list[tuple[str, str]] = []
    blocks: list[str] = []
    for model in scenario.params["models"]:
        workload = Workload(shapes=parse_shapes(shapes.get(model, [])))
        session = measure(
            ctx,
            scenario,
            model,
            [_inprocess(ctx, model), _native(ctx, model)],
            _levels([1]),
            workload,
        )
        served = session.targets[1]
        split = served.levels[0].server
        added_p50 = p50_ms(session, 1) - p50_ms(session, 0)
        added_p99 = p99_ms(session, 1) - p99_ms(session, 0)
        rows.append(
            [
                model,
                fmt(p50_ms(session, 0), 3),
                fmt(p50_ms(session, 1), 3),
                fmt(added_p50, 3),
                fmt(p99_ms(session, 0), 3),
                fmt(p99_ms(session, 1), 3),
                fmt(added_p99, 3),
                fmt(split.mean_queue_ms if split else None, 3),
                served.description.get("max_queue_delay_us", "n/a"),
            ]
        )
        headline.append(
            (
                f"Added latency at c=1, {model}: served p50 - in-process p50",
                f"{fmt(added_p50, 3)} ms",
            )
        )
        blocks += [f"#### {model}", session_tables(session), figure_links(ctx, scenario, model)]
    summary = markdown_table(
        (
            "model",
            "in-process p50 ms",
            "served p50 ms",
            "added p50 ms",
            "in-process p99 ms",
            "served p99 ms",
            "added p99 ms",
            "server queue ms",
            "max_queue_delay_us",
        ),
        rows,
    )
    delayed = [r for r in rows if r[8].isdigit() and int(r[8]) > 0]
    observation = (
        "Where the model has a queue delay, a lone request waited in the server's queue "
        + ", ".join(f"{r[7]} ms ({r[0]}, max_queue_delay_us {r[8]})" for r in delayed)
        + "; with no delay it waited "
        + ", ".join(f"{r[7]} ms ({r[0]})" for r in rows if r not in delayed)
        + "."
        if delayed
        else ""
    )
    overshoot = [
        r[0]
        for r in delayed
        if int(r[8]) < 1000 and float(r[7].replace(",", "")) > 2 * int(r[8]) / 1e3 + 0.3
    ]
    if overshoot:
        observation += (
            f" For {', '.join(overshoot)} the wait is well over the configured sub-millisecond "
            "delay, consistent with asyncio's timers, which wait in whole milliseconds (epoll)."
        )
    return ScenarioResult(
        scenario,
        headline=headline,
        body=[
            "One request at a time (closed loop c=1, one row; text_encoder with 16 tokens), "
            "served through the native API against the same model file run in-process. The "
            "difference is what serving adds: gRPC, protobuf, the batcher's queue and thread "
            "hand-offs. The last two columns set the server's measured queue time beside the "
            "model's configured max_queue_delay_us.",
            summary,
            observation,
            *blocks,
        ],
    )


def native_vs_oip(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    if not stubs_present():
        raise ScenarioPending(
            "OIP frontend not present: `from inferd_wire.proto.inference import grpc_service_pb2`"
        )
    oip = TargetSpec("oip", ctx.inferd.target, model, label=f"oip/{model}")
    driver = OipDriver(oip)
    try:
        driver.signature()
    except TargetError as exc:
        raise ScenarioPending(f"OIP frontend not serving: {exc}") from None
    finally:
        driver.close()
    native = _native(ctx, model, f"native/{model}")
    levels = _levels(scenario.params["concurrency"])
    session = measure(ctx, scenario, model, [native, oip], levels)
    native_levels, oip_levels = (t.levels for t in session.targets)
    per_level = ", ".join(
        f"{n.level.label}: {fmt(o.requests_per_s / n.requests_per_s)}"
        for n, o in zip(native_levels, oip_levels, strict=True)
    )
    return ScenarioResult(
        scenario,
        headline=[(f"OIP ÷ native req/s ({model}, same server)", per_level)],
        body=[
            f"The same server process and model (`{model}`), driven through "
            "`inferd.v1.Predict/Predict` and through `inference.GRPCInferenceService/ModelInfer` "
            "(raw_input_contents), interleaved.",
            session_tables(session),
            figure_links(ctx, scenario, model),
        ],
    )


def peak_rate(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    target = _native(ctx, model)
    closed = measure(
        ctx, scenario, f"{model}-closed", [target], _levels(scenario.params["concurrency"])
    )
    best = max(closed.targets[0].levels, key=lambda r: r.requests_per_s)
    peak = best.requests_per_s
    arrival = scenario.params.get("arrival", "poisson")
    fractions = [float(f) for f in scenario.params["open_fractions"]]
    open_levels = [
        LoadLevel("open", rate=round(peak * f), arrival=arrival) for f in fractions if peak > 0
    ]
    opened = measure(ctx, scenario, f"{model}-open", [target], open_levels)
    headline = [
        (
            f"Peak RPC rate, one inferd process, {model}",
            f"{fmt(peak, 0)} req/s at {best.level.label}",
        )
    ]
    for index, (fraction, result) in enumerate(
        zip(fractions, opened.targets[0].levels, strict=False)
    ):
        headline.append(
            (
                f"  open loop at {fraction:.0%} of peak ({result.level.label}): p50 / p99",
                f"{fmt(p50_ms(opened, 0, index), 3)} / {fmt(p99_ms(opened, 0, index), 3)} ms",
            )
        )
    return ScenarioResult(
        scenario,
        headline=headline,
        body=[
            f"`{model}` is one 16x16 MatMul: a request's cost is nearly all serving overhead. "
            "Closed-loop sweep first; the peak is its best level. Then open loop (Poisson "
            "arrivals, latency from each request's intended send time) at fractions of that "
            "peak, where queueing shows in the tail.",
            session_tables(closed),
            figure_links(ctx, scenario, f"{model}-closed"),
            session_tables(opened),
            figure_links(ctx, scenario, f"{model}-open"),
        ],
    )
