"""Scenario 8: inferd beside the framework ceiling (`loadtest/bench/ceiling.py`, a grpc.aio server
that answers without inferring) and Triton, on the same model through the same harness, with
each server's CPU time per request: the gap between inferd and the ceiling is what inferd's own
request path costs, and no change to that path can win more than it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence

from inferd.loadtest.bench.costs import CEILING, INFERD, TRITON, CostRatio, ServerCost, cost_ratios
from inferd.loadtest.bench.document import framework_ceiling_body, framework_ceiling_tables
from inferd.loadtest.bench.peers import start_peer
from inferd.loadtest.bench.scenario import (
    BenchContext,
    Scenario,
    ScenarioResult,
    fmt,
    measure,
)
from inferd.loadtest.bench.triton import triton_version
from inferd.loadtest.bench.venvs import PeerUnavailable
from inferd.loadtest.levels import closed_levels
from inferd.loadtest.server_process import ServerProcess, ServerStartError, start_ceiling
from inferd.loadtest.targets.oip import stubs_present
from inferd.loadtest.targets.target import TargetKind, TargetSpec


def _target(label: str, protocol: TargetKind, server: ServerProcess, model: str) -> TargetSpec:
    return TargetSpec(protocol, server.target, model, label=label, pid=server.process.pid)


def _per_level(ratios: Sequence[CostRatio], protocol: str, figure: str) -> str:
    return ", ".join(
        f"{r.level}: {fmt(getattr(r, figure))}" for r in ratios if r.protocol == protocol
    )


def _headline(
    model: str,
    protocols: Sequence[str],
    versus_ceiling: Sequence[CostRatio],
    versus_triton: Sequence[CostRatio],
    scenario_id: int,
) -> list[tuple[str, str]]:
    headline: list[tuple[str, str]] = []
    for protocol in protocols:
        headline += [
            (
                f"inferd ÷ ceiling req/s ({model}, {protocol})",
                _per_level(versus_ceiling, protocol, "requests_per_s"),
            ),
            (
                f"  server CPU per request, inferd ÷ ceiling ({protocol})",
                _per_level(versus_ceiling, protocol, "cpu_per_request"),
            ),
        ]
    if versus_triton:
        headline += [
            (
                f"inferd ÷ triton req/s ({model}, oip)",
                _per_level(versus_triton, "oip", "requests_per_s"),
            ),
            (
                "  server CPU per request, inferd ÷ triton (oip)",
                _per_level(versus_triton, "oip", "cpu_per_request"),
            ),
        ]
    else:
        headline.append(("inferd ÷ triton", f"not run (see scenario {scenario_id})"))
    return headline


def framework_ceiling(ctx: BenchContext, scenario: Scenario) -> ScenarioResult:
    model = scenario.params["model"]
    protocols: list[TargetKind] = [
        p for p in ("native", "oip") if p in scenario.params.get("protocols", ["native", "oip"])
    ]
    notes: list[str] = []
    if "oip" in protocols and not stubs_present():
        protocols.remove("oip")
        notes.append("The Open Inference Protocol stubs are not installed: native API only.")
    # Target label -> which server it is.
    servers: dict[str, str] = {}
    targets: list[TargetSpec] = []
    with contextlib.ExitStack() as stack:
        ceiling = start_ceiling(ctx.repository, ctx.workdir / "ceiling" / "ceiling.log")
        stack.callback(ceiling.stop)
        for protocol in protocols:
            for name, server in ((CEILING, ceiling), (INFERD, ctx.inferd)):
                targets.append(_target(f"{name} {protocol}", protocol, server, model))
                servers[targets[-1].name] = name
        if TRITON in scenario.params.get("peers", []):
            if "oip" not in protocols:
                notes.append("Triton not run: it speaks only the Open Inference Protocol.")
            else:
                try:
                    triton = start_peer(ctx, TRITON, model, 0)
                except (
                    PeerUnavailable,
                    ServerStartError,
                    OSError,
                    subprocess.SubprocessError,
                ) as exc:
                    notes.append(f"**Triton could not run here, so no inferd ÷ Triton**: {exc}")
                else:
                    stack.callback(triton.stop)
                    label = f"triton {triton_version(triton)} oip"
                    targets.append(_target(label, "oip", triton, model))
                    servers[label] = TRITON
        levels = closed_levels(",".join(str(c) for c in scenario.params["concurrency"]))
        session = measure(ctx, scenario, model, targets, levels)
    costs = [
        ServerCost.of(servers[report.spec.name], report.spec.name, report.spec.kind, result)
        for report in session.targets
        for result in report.levels
    ]
    versus_ceiling = cost_ratios(costs, CEILING)
    versus_triton = cost_ratios(costs, TRITON)
    notes.extend(session.notes)
    if not any(c.server == TRITON for c in costs) and not any("Triton" in n for n in notes):
        notes.append("Triton not run: the scenario names no Triton peer.")
    body = framework_ceiling_body(ctx, scenario, model, costs, versus_ceiling, versus_triton, notes)
    tables = framework_ceiling_tables(costs, versus_ceiling, versus_triton)
    print("\n\n".join([*tables, *notes]), flush=True)
    headline = _headline(model, protocols, versus_ceiling, versus_triton, scenario.id)
    return ScenarioResult(scenario, headline=headline, body=body)
