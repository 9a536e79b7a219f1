"""`inferd serve | predict | status | health | models list`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TARGET = "127.0.0.1:8001"


def _serve(args: argparse.Namespace) -> int:
    from inferd.app import serve
    from inferd.config import ServerConfig
    from inferd.observability.logging import configure_logging
    from inferd.tls import TlsConfigError

    config = ServerConfig.load(
        args.config,
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        log_level=args.log_level,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        workers=args.workers,
    )
    configure_logging(config.log_level, config.log_format)
    try:
        if config.workers > 1:
            from inferd.workers.supervisor import supervise

            return asyncio.run(supervise(config))
        asyncio.run(serve(config))
    except TlsConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _client(args: argparse.Namespace, **kwargs: Any) -> Any:
    """An InferClient for the connection flags (`--url`, `--tls*`)."""
    from inferd_client import InferClient

    if args.tls and not (args.tls_ca or args.tls_cert or args.tls_key):
        import grpc

        kwargs["credentials"] = grpc.ssl_channel_credentials()
    try:
        return InferClient(
            args.url,
            root_certificates=args.tls_ca,
            certificate_chain=args.tls_cert,
            private_key=args.tls_key,
            server_name_override=args.tls_server_name,
            **kwargs,
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _random_input(datatype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    from inferd_wire.codec import DTYPES

    if datatype == "BYTES":
        return np.array([f"text {i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(
            shape
        )
    dtype = DTYPES[datatype]
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def _parse_pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"{flag} takes NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def _predict(args: argparse.Namespace) -> int:
    from inferd_client import InferError

    files = _parse_pairs(args.input, "--input")
    shapes = {
        name: [int(d) for d in dims.split(",") if d]
        for name, dims in _parse_pairs(args.shape, "--shape").items()
    }
    rng = np.random.default_rng(args.seed)
    with _client(args) as client:
        try:
            inputs: dict[str, np.ndarray] = {}
            if files.keys() != shapes.keys() or not files:
                metadata = client.metadata(args.model, version=args.version)
                for spec in metadata.inputs:
                    if spec.name in files:
                        continue
                    shape = shapes.get(spec.name) or [
                        args.batch if i == 0 and metadata.max_batch_size else (d if d >= 0 else 1)
                        for i, d in enumerate(spec.shape)
                    ]
                    inputs[spec.name] = _random_input(spec.datatype, shape, rng)
            for name, path in files.items():
                inputs[name] = np.load(path, allow_pickle=False)
            outputs = client.infer(
                args.model,
                inputs,
                outputs=args.output or None,
                version=args.version,
                timeout=args.timeout,
            )
        except InferError as exc:
            print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
            return 1
    np.set_printoptions(precision=4, threshold=40, edgeitems=4)
    for name, array in outputs.items():
        print(f"{name} {array.dtype} {list(array.shape)}")
        print(array)
    return 0


def _status(args: argparse.Namespace) -> int:
    from inferd_client import InferError

    with _client(args) as client:
        try:
            if args.model:
                models = {args.model: client.status(args.model)}
            else:
                models = client.list_models()
        except InferError as exc:
            print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
            return 1
    if getattr(args, "stages", False):
        return _print_stages(models)
    header = ("MODEL", "VERSION", "STATE", "OK", "FAIL", "BATCHES")
    print("{:<20} {:>7} {:<10} {:>8} {:>6} {:>8}  REASON".format(*header))
    for name, versions in models.items():
        for v in versions:
            s = v.statistics
            print(
                f"{name:<20} {v.version:>7} {v.state:<10} {s['request_success']:>8} "
                f"{s['request_failure']:>6} {s['execution_count']:>8}  {v.reason}"
            )
    return 0


STAGES = ("decode", "queue", "assemble", "handoff", "infer", "split", "encode", "handler")


def _print_stages(models: dict[str, list[Any]]) -> int:
    """Mean microseconds per successful request in each stage of the server's path."""
    print("{:<20} {:>7} {:>8}".format("MODEL", "VERSION", "REQUESTS"), end="")
    print("".join(f" {stage.upper():>9}" for stage in STAGES), " (mean µs)")
    for name, versions in models.items():
        for v in versions:
            stages = v.statistics["stages"]
            count = stages["count"]
            means = [stages[f"{s}_ns"] / count / 1e3 if count else 0.0 for s in STAGES]
            print(f"{name:<20} {v.version:>7} {count:>8}", end="")
            print("".join(f" {m:>9.1f}" for m in means))
    return 0


def _models_validate(args: argparse.Namespace) -> int:
    from inferd import model_files
    from inferd.core.models.config import load_model_config

    config = load_model_config(args.config) if args.config else None
    try:
        validation = model_files.validate(args.file, config)
    except Exception as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(model_files.describe(validation))
    return 0


def _models_add(args: argparse.Namespace) -> int:
    from inferd import model_files

    try:
        path = model_files.add(args.file, args.repository, args.name, args.version, args.config)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _models_control(args: argparse.Namespace) -> int:
    from inferd_client import InferError

    with _client(args, control_token=args.token) as client:
        try:
            if args.models_command == "load":
                for v in client.load_model(args.model):
                    print(f"{args.model} {v.version} {v.state} {v.reason}".rstrip())
            elif args.models_command == "unload":
                client.unload_model(args.model)
                print(f"{args.model} unloaded")
            else:
                for e in client.repository_index():
                    print(f"{e.model:<20} {e.version:>7} {e.state:<10} {e.reason}".rstrip())
        except InferError as exc:
            print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
            return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    from inferd_client import InferError

    with _client(args) as client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except InferError as exc:
            print(f"error: {exc.code.name}: {exc.details}", file=sys.stderr)
            return 1
    print(status)
    return 0 if status == "SERVING" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferd", description="ONNX inference over gRPC")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model repository")
    serve.add_argument("--model-repository", type=Path)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (default 8002, -1 off)")
    serve.add_argument("--metrics-host", help="address of /metrics (plain HTTP; default --host)")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates (mTLS)"
    )
    serve.add_argument(
        "--workers", type=int, help="frontend processes sharing the port (default 1: one process)"
    )
    serve.add_argument("--config", type=Path, help="TOML file with any ServerConfig field")
    serve.add_argument("--log-level")
    serve.set_defaults(run=_serve)

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            default=DEFAULT_TARGET,
            help=f"server (default {DEFAULT_TARGET}); several: IP:PORT,IP:PORT or dns:///NAME:PORT",
        )
        tls = p.add_argument_group("TLS (any of these turns it on)")
        tls.add_argument("--tls", action="store_true", help="TLS, verified with the system CAs")
        tls.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server certificate")
        tls.add_argument("--tls-cert", type=Path, help="PEM client certificate chain (mTLS)")
        tls.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
        tls.add_argument("--tls-server-name", help="name to verify the server certificate for")

    predict = sub.add_parser("predict", help="run one request; random inputs unless given")
    predict.add_argument("model")
    predict.add_argument("--version", type=int)
    predict.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    predict.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...")
    predict.add_argument("--batch", type=int, default=1, help="rows for random inputs")
    predict.add_argument("--output", action="append", default=[], metavar="NAME")
    predict.add_argument("--timeout", type=float, default=30.0, help="seconds")
    predict.add_argument("--seed", type=int, default=0)
    client_args(predict)
    predict.set_defaults(run=_predict)

    status = sub.add_parser("status", help="model versions, states and counters")
    status.add_argument("model", nargs="?")
    status.add_argument(
        "--stages",
        action="store_true",
        help="mean µs per request in each stage (decode, queue, ..., handler)",
    )
    client_args(status)
    status.set_defaults(run=_status)

    models = sub.add_parser("models", help="model commands")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_list = models_sub.add_parser("list", help="every model the server knows")
    models_list.set_defaults(run=_status, model=None)
    client_args(models_list)

    validate = models_sub.add_parser(
        "validate", help="check a model file; print what inferd serves"
    )
    validate.add_argument("file", type=Path)
    validate.add_argument("--config", type=Path, help="a config.toml to apply")
    validate.set_defaults(run=_models_validate)

    add = models_sub.add_parser("add", help="publish a model file into a repository atomically")
    add.add_argument("file", type=Path)
    add.add_argument("--repository", type=Path, required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--version", type=int, help="default: the newest on disk + 1")
    add.add_argument("--config", type=Path, help="a config.toml to install with it")
    add.set_defaults(run=_models_add)

    def control_args(p: argparse.ArgumentParser) -> None:
        client_args(p)
        p.add_argument(
            "--token",
            default=os.environ.get("INFERD_CONTROL_TOKEN"),
            help="control token (default: $INFERD_CONTROL_TOKEN)",
        )
        p.set_defaults(run=_models_control)

    for command, text in (("load", "load or reload a model"), ("unload", "unload a model")):
        p = models_sub.add_parser(command, help=f"{text} (server in explicit model control)")
        p.add_argument("model")
        control_args(p)
    control_args(models_sub.add_parser("index", help="every version on disk or served"))

    health = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.add_argument("--timeout", type=float, default=5.0)
    client_args(health)
    health.set_defaults(run=_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
