"""`inferd-loadtest` (also `python -m inferd.loadtest`): drive one target, or compare several.

    inferd-loadtest --target native:127.0.0.1:8001 --model mlp --concurrency 1,4,16,64
    inferd-loadtest --target native:127.0.0.1:8001 --model mlp --rate 200,800 --arrival poisson
    inferd-loadtest --model mlp --concurrency 32 --compare \\
        native:127.0.0.1:8001 native:127.0.0.1:8001,model=mlp_nobatch,label=batching-off
    inferd-loadtest --target native:127.0.0.1:8001 --model mlp --connections 4 --concurrency 64

Writes report.json, report.csv and PNG plots to --out and prints a table (and, with
--compare, every target's figures as ratios of the first's).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from inferd.loadtest.inputs import InputError, load_input_files, parse_shapes
from inferd.loadtest.levels import LoadLevel, closed_levels, open_levels
from inferd.loadtest.runner import MeasurementPlan, RunError
from inferd.loadtest.session import Workload, run_session
from inferd.loadtest.targets.target import TargetError, TargetSpec, parse_target

DEFAULT_TARGET = "native:127.0.0.1:8001"
RESULTS = Path("loadtest") / "results"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferd-loadtest",
        description="Open- and closed-loop load tests of inferd and other gRPC model servers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Targets: KIND:WHERE[,model=M,version=V,label=L,client_batch=N,threads=N,pid=P,"
            "connections=N] "
            "with KIND native (inferd.v1), oip (Open Inference Protocol / KServe v2 gRPC) or "
            "inprocess (onnxruntime on a model file or repository directory). Loopback "
            "addresses only. pid=P: the server's process, whose CPU time (descendants "
            "included) is reported per request. connections=N: HTTP/2 connections per worker "
            "(a server with several frontend processes on one port balances per connection). "
            "TLS servers: ,tls_ca=CA.pem (and "
            ",tls_cert=C.pem,tls_key=K.pem for mutual TLS, ,tls_server_name=NAME), or the "
            "--tls-* flags for every network target."
        ),
    )
    what = parser.add_argument_group("what to load")
    chosen = what.add_mutually_exclusive_group()
    chosen.add_argument("--target", default=None, help=f"one target (default {DEFAULT_TARGET})")
    chosen.add_argument(
        "--compare",
        nargs="+",
        metavar="TARGET",
        help="several targets, measured interleaved; ratios are against the first",
    )
    what.add_argument("--model", default="", help="model name (unless a target names its own)")
    what.add_argument("--client-batch", type=int, default=1, help="rows per request (default 1)")
    what.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="full shape of an input with variable dims",
    )
    what.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy|FILE.npz",
        help="input data from files instead of random values",
    )
    what.add_argument("--seed", type=int, default=0, help="random inputs and Poisson arrivals")
    tls = parser.add_argument_group("TLS (network targets that set no tls_* key of their own)")
    tls.add_argument("--tls-ca", default="", help="PEM CA that signed the server certificate")
    tls.add_argument("--tls-cert", default="", help="PEM client certificate chain (mTLS)")
    tls.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    tls.add_argument("--tls-server-name", default="", help="name to verify the certificate for")

    load = parser.add_argument_group("load levels")
    load.add_argument("--concurrency", help="closed-loop sweep, e.g. 1,4,16,64")
    load.add_argument("--rate", help="open-loop sweep in requests/s, e.g. 100,500,1000")
    load.add_argument("--arrival", choices=("constant", "poisson"), default="poisson")
    load.add_argument("--workers", type=int, default=2, help="load-generating processes")
    load.add_argument(
        "--connections",
        type=int,
        default=1,
        help="HTTP/2 connections per worker to each network target that sets no connections= "
        "of its own (default 1)",
    )
    load.add_argument("--rounds", type=int, default=1, help="repeat the sweep, merged")
    load.add_argument(
        "--max-in-flight",
        type=int,
        default=1024,
        help="open loop, per worker: outstanding requests before sending late",
    )

    measure = parser.add_argument_group("measurement")
    measure.add_argument("--warmup", type=float, default=2.0, help="seconds (default 2)")
    measure.add_argument("--window", type=float, default=5.0, help="seconds (default 5)")
    measure.add_argument(
        "--tolerance",
        type=float,
        default=10.0,
        help="%% within which the last 3 windows must agree (default 10)",
    )
    measure.add_argument("--max-windows", type=int, default=6, help="per level (default 6)")
    fixed = measure.add_mutually_exclusive_group()
    fixed.add_argument("--duration", type=float, help="measure exactly this long per level (s)")
    fixed.add_argument("--count", type=int, help="measure this many requests per level")
    measure.add_argument("--request-timeout", type=float, default=30.0, help="seconds")
    measure.add_argument(
        "--time-limit",
        type=float,
        default=1800.0,
        help="whole run, seconds; levels that would pass it are skipped",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help=f"directory (default {RESULTS}/<time>)")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _levels(args: argparse.Namespace) -> list[LoadLevel]:
    levels: list[LoadLevel] = []
    if args.concurrency:
        levels += closed_levels(args.concurrency)
    if args.rate:
        levels += open_levels(args.rate, args.arrival)
    return levels or closed_levels("1,4,16,64")


def _targets(args: argparse.Namespace) -> list[TargetSpec]:
    texts = args.compare or [args.target or DEFAULT_TARGET]
    if args.connections < 1:
        raise TargetError(f"--connections: 1 or more, got {args.connections}")
    specs = [parse_target(text, args.model, args.connections) for text in texts]
    tls = {
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
    }
    if not any(tls.values()):
        return specs
    if bool(args.tls_cert) != bool(args.tls_key):
        raise TargetError("--tls-cert and --tls-key go together")
    return [
        dataclasses.replace(spec, **tls) if spec.kind != "inprocess" and not spec.tls else spec
        for spec in specs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        targets = _targets(args)
        levels = _levels(args)
        workload = Workload(
            client_batch=args.client_batch,
            shapes=parse_shapes(args.shape),
            files=load_input_files(args.input),
            seed=args.seed,
        )
    except (TargetError, InputError, ValueError, OSError) as exc:
        parser.error(str(exc))
    plan = MeasurementPlan(
        warmup_s=args.warmup,
        window_s=args.window,
        tolerance=args.tolerance / 100.0,
        max_windows=max(args.max_windows, 3),
        duration_s=args.duration,
        count=args.count,
        max_in_flight=args.max_in_flight,
        request_timeout_s=args.request_timeout,
    )
    try:
        session = run_session(
            targets,
            levels,
            plan,
            workload,
            workers=max(1, args.workers),
            rounds=max(1, args.rounds),
            time_limit_s=args.time_limit,
            progress=not args.quiet,
        )
    except (TargetError, InputError, RunError) as exc:
        print(f"inferd-loadtest: {exc}", file=sys.stderr)
        return 1

    from inferd.loadtest.report import format_session, write_csv, write_json

    out: Path = args.out or RESULTS / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    write_json(session, out / "report.json")
    write_csv(session, out / "report.csv")
    written = [out / "report.json", out / "report.csv"]
    if not args.no_plots:
        from inferd.loadtest.plots import write_plots

        written += write_plots(session, out)
    print(format_session(session))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
