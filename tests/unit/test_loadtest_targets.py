"""Target specs (loopback only) and request inputs of the load-test harness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferd.loadtest.cli import _targets as cli_targets
from inferd.loadtest.cli import build_parser
from inferd.loadtest.inputs import (
    InputError,
    ModelSignature,
    TensorSpec,
    build_payloads,
    load_input_files,
    parse_shapes,
    rows_of,
)
from inferd.loadtest.targets.channels import SenderChannels
from inferd.loadtest.targets.target import TargetError, parse_target, require_loopback

MLP = ModelSignature("mlp", (TensorSpec("input", "FP32", (-1, 64)),), batched=True)
TEXT = ModelSignature(
    "text_encoder",
    (TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1))),
    batched=True,
)


def test_target_spec_names_kind_address_and_options() -> None:
    spec = parse_target("native:127.0.0.1:8001,model=mlp_nobatch,label=off,client_batch=4", "mlp")
    assert (spec.kind, spec.where, spec.model, spec.label, spec.client_batch) == (
        "native",
        "127.0.0.1:8001",
        "mlp_nobatch",
        "off",
        4,
    )
    assert spec.name == "off"
    assert parse_target("oip:localhost:9000", "mlp").name == "oip/mlp"
    assert parse_target("inprocess:models,threads=2", "cnn").threads == 2


def test_tls_keys_of_a_target() -> None:
    spec = parse_target("oip:127.0.0.1:8001,tls_ca=ca.pem,tls_server_name=inferd.test", "mlp")
    assert (spec.tls, spec.tls_ca, spec.tls_server_name) == (True, "ca.pem", "inferd.test")
    assert not parse_target("native:127.0.0.1:8001", "mlp").tls
    mutual = parse_target("native:127.0.0.1:8001,tls_ca=ca.pem,tls_cert=c.pem,tls_key=k.pem", "m")
    assert (mutual.tls_cert, mutual.tls_key) == ("c.pem", "k.pem")


@pytest.mark.parametrize(
    "text",
    [
        "native:127.0.0.1:1,tls_cert=c.pem",  # without its key
        "inprocess:models,tls_ca=ca.pem",  # no connection to secure
    ],
)
def test_incomplete_or_misplaced_tls_keys_are_refused(text: str) -> None:
    with pytest.raises(TargetError, match="tls"):
        parse_target(text, "mlp")


def test_connections_of_a_target() -> None:
    assert parse_target("native:127.0.0.1:8001", "mlp").connections == 1
    assert parse_target("oip:127.0.0.1:8001,connections=4", "mlp").connections == 4
    # The flag's value applies where the spec sets none; an in-process target has none.
    assert parse_target("native:127.0.0.1:8001", "mlp", default_connections=3).connections == 3
    assert (
        parse_target("native:127.0.0.1:1,connections=2", "m", default_connections=3).connections
        == 2
    )
    assert parse_target("inprocess:models", "mlp", default_connections=3).connections == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("native:127.0.0.1:1,connections=0", "1 or more"),
        ("native:127.0.0.1:1,connections=many", "connections=many"),
        ("inprocess:models,connections=2", "network targets"),
    ],
)
def test_bad_connections_are_refused(text: str, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        parse_target(text, "mlp")


def test_the_connections_flag_reaches_every_network_target() -> None:
    args = build_parser().parse_args(
        ["--model", "mlp", "--connections", "4", "--compare", "native:127.0.0.1:1",
         "oip:127.0.0.1:1,connections=2", "inprocess:models"]
    )  # fmt: skip
    assert [spec.connections for spec in cli_targets(args)] == [4, 2, 1]
    with pytest.raises(TargetError, match="--connections"):
        cli_targets(build_parser().parse_args(["--model", "mlp", "--connections", "0"]))


async def test_a_sender_takes_a_channel_per_connection_in_turn() -> None:
    spec = parse_target("native:127.0.0.1:1,connections=3", "mlp")
    channels = SenderChannels(spec)
    try:
        assert len(channels.channels) == 3
        turns = channels.in_turn("/inferd.v1.Predict/Predict")
        picked = [turns() for _ in range(6)]
        assert len({id(m) for m in picked}) == 3 and picked[3:] == picked[:3]
    finally:
        await channels.close()


@pytest.mark.parametrize(
    "text",
    ["grpc:127.0.0.1:1", "native:", "native:127.0.0.1:1,colour=red", "native:127.0.0.1:x"],
)
def test_malformed_targets_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(TargetError):
        parse_target(text, "mlp")


@pytest.mark.parametrize("address", ["127.0.0.1:8001", "127.3.2.1:80", "[::1]:8001"])
def test_loopback_addresses_are_accepted(address: str) -> None:
    require_loopback(address)


@pytest.mark.parametrize(
    "address", ["10.0.0.7:8001", "192.168.1.20:8001", "8.8.8.8:53", "0.0.0.0:8001"]
)
def test_other_addresses_are_never_targets(address: str) -> None:
    with pytest.raises(TargetError, match="loopback"):
        parse_target(f"oip:{address}", "mlp")


def test_random_payloads_take_the_declared_shapes_with_client_batch_rows() -> None:
    payloads = build_payloads(MLP, client_batch=8, seed=1, distinct=3)
    assert len(payloads) == 3
    assert all(p["input"].shape == (8, 64) and p["input"].dtype == np.float32 for p in payloads)
    assert not np.array_equal(payloads[0]["input"], payloads[1]["input"])
    assert rows_of(payloads[0], MLP.batched) == 8


def test_variable_dims_need_a_shape_and_then_take_it() -> None:
    with pytest.raises(InputError, match="--shape input_ids"):
        build_payloads(TEXT)
    shapes = parse_shapes(["input_ids=2,12", "attention_mask=2,12"])
    (payload, *_) = build_payloads(TEXT, shapes=shapes)
    assert payload["input_ids"].shape == (2, 12)
    assert payload["input_ids"].dtype == np.int64


def test_unbatched_model_refuses_a_client_batch() -> None:
    unbatched = ModelSignature("m", (TensorSpec("x", "FP32", (3,)),), batched=False)
    with pytest.raises(InputError, match="no batch dimension"):
        build_payloads(unbatched, client_batch=4)
    assert rows_of(build_payloads(unbatched)[0], False) == 1


def test_bytes_inputs_are_random_texts() -> None:
    echo = ModelSignature("echo", (TensorSpec("text", "BYTES", (-1,)),), batched=True)
    (payload, *_) = build_payloads(echo, client_batch=3)
    assert payload["text"].dtype == object
    assert all(isinstance(v, bytes) for v in payload["text"])


def test_inputs_come_from_npy_and_npz_files(tmp_path: Path) -> None:
    data = np.arange(128, dtype=np.float32).reshape(2, 64)
    np.save(tmp_path / "x.npy", data)
    np.savez(tmp_path / "all.npz", input=data * 2)
    from_npy = load_input_files([f"input={tmp_path / 'x.npy'}"])
    from_npz = load_input_files([str(tmp_path / "all.npz")])
    (payload, *_) = build_payloads(MLP, files=from_npy)
    np.testing.assert_array_equal(payload["input"], data)
    np.testing.assert_array_equal(from_npz["input"], data * 2)
    with pytest.raises(InputError, match="no such input"):
        build_payloads(MLP, files={"image": data})


# --- module structure -----------------------------------------------------------------------


def _harness_imports() -> dict[str, set[str]]:
    """Every harness module -> the harness modules it imports, at the top or inside a function
    (a lazy import still ties the two modules together)."""
    import ast

    import inferd.loadtest

    root = Path(inferd.loadtest.__file__).parent
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(("inferd.loadtest", *parts))] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from pkg import module` imports pkg.module; `from module import name`, module.
                found.update(
                    f"{node.module}.{alias.name}"
                    if f"{node.module}.{alias.name}" in modules
                    else node.module
                    for alias in node.names
                )
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_harness_modules_import_each_other_without_a_cycle() -> None:
    graph = _harness_imports()
    assert "inferd.loadtest.targets.native" in graph
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path, module))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_target_kinds_depend_on_the_shared_target_module_not_on_the_runner() -> None:
    graph = _harness_imports()
    for kind in ("native", "oip", "inprocess"):
        imported = graph[f"inferd.loadtest.targets.{kind}"]
        assert "inferd.loadtest.targets.target" in imported
        assert not imported & {"inferd.loadtest.runner", "inferd.loadtest.session"}
