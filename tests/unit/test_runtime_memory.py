"""Host memory held by ONNX Runtime's CPU arena: `cpu_memory_arena` reaches the session's and
each run's options, and with "shrink" or "off" a large run's memory goes back to the system.

The model is built here: one MatMul whose output is far larger than its input ([n, 1] x
[1, 65536]), so a batch of 1024 rows needs a 256 MiB intermediate inside the graph while only
4 KiB is sent and returned."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.runtime.session import ALLOW_SPINNING, OnnxRuntimeSession, resolve_providers
from inferd.core.runtime.slots import ORT_LOG_SEVERITY, SHRINK_ARENAS, BindingSlot, PlainSlot

CPU = resolve_providers(["cpu"], {})
WIDTH = 65536
ROWS = 1024
MIB = 1 << 20


@pytest.fixture(scope="module")
def widening(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x [n, 1] -> MatMul with ones [1, WIDTH] -> [n, WIDTH] -> ReduceSum over dim 1 -> y [n]."""
    ones = helper.make_tensor("ones", TensorProto.FLOAT, [1, WIDTH], np.ones(WIDTH, np.float32))
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "ones"], ["wide"]),
            helper.make_node("ReduceSum", ["wide", "axes"], ["y"], keepdims=0),
        ],
        "widening",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        initializer=[ones, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path = tmp_path_factory.mktemp("arena") / "widening" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, path)
    return path


def open_session(
    path: Path, arena: str | None, io_binding: bool | None = None
) -> OnnxRuntimeSession:
    config = ModelConfig.model_validate({"max_batch_size": ROWS, "cpu_memory_arena": arena})
    return OnnxRuntimeSession(
        path,
        CPU,
        intra_op_threads=1,
        effective=EffectiveConfig.merge(config, ModelDefaults()),
        io_binding=io_binding,
    )


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize("io_binding", [None, True])
@pytest.mark.parametrize(
    ("arena", "arena_on", "shrinks"),
    [("keep", True, False), ("shrink", True, True), ("off", False, False), (None, False, False)],
)
def test_cpu_memory_arena_reaches_the_session_and_every_runs_options(
    widening: Path, arena: str | None, arena_on: bool, shrinks: bool, io_binding: bool | None
) -> None:
    """None: the server default ("off", docs/operations.md)."""
    s = open_session(widening, arena, io_binding)
    try:
        (ort_session,) = s._sessions
        options = ort_session.get_session_options()
        assert options.enable_cpu_mem_arena is arena_on
        assert options.log_severity_level == ORT_LOG_SEVERITY
        (slot,) = s._slots
        assert isinstance(slot, BindingSlot if io_binding else PlainSlot)
        run_options = slot._run_options
        assert run_options.log_severity_level == ORT_LOG_SEVERITY
        if shrinks:
            assert run_options.get_run_config_entry(SHRINK_ARENAS) == "cpu:0"
        else:
            with pytest.raises(RuntimeError, match=SHRINK_ARENAS):
                run_options.get_run_config_entry(SHRINK_ARENAS)
        np.testing.assert_array_equal(
            s.run_batch([{"x": np.ones((2, 1), np.float32)}], ()).outputs[0]["y"], [WIDTH, WIDTH]
        )
    finally:
        s.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(("arena", "kept"), [("keep", True), ("shrink", False), ("off", False)])
def test_large_runs_memory_returns_to_the_system_unless_the_arena_keeps_it(
    widening: Path, arena: str, kept: bool
) -> None:
    s = open_session(widening, arena)
    try:
        small = {"x": np.ones((1, 1), np.float32)}
        s.run_batch([small], ())
        before = rss()
        run = s.run_batch([{"x": np.ones((ROWS, 1), np.float32)}], ())
        assert run.outputs[0]["y"].shape == (ROWS,)
        del run
        s.run_batch([small], ())
        held = rss() - before
        intermediate = ROWS * WIDTH * 4
        if kept:
            # The control: the arena holds the 256 MiB intermediate, so the test can tell.
            assert held > intermediate // 2, f"{held / MIB:.0f} MiB held"
        else:
            assert held < 32 * MIB, f"{held / MIB:.0f} MiB still held of {intermediate / MIB:.0f}"
    finally:
        s.close()


@pytest.mark.parametrize(("spinning", "entry"), [(True, None), (False, "0")])
def test_intra_op_spinning_reaches_the_session(
    widening: Path, spinning: bool, entry: str | None
) -> None:
    config = ModelConfig.model_validate({"max_batch_size": ROWS, "intra_op_spinning": spinning})
    s = OnnxRuntimeSession(
        widening, CPU, intra_op_threads=1, effective=EffectiveConfig.merge(config, ModelDefaults())
    )
    try:
        (ort_session,) = s._sessions
        options = ort_session.get_session_options()
        if entry is None:  # ONNX Runtime's own default: spinning
            with pytest.raises(RuntimeError):
                options.get_session_config_entry(ALLOW_SPINNING)
        else:
            assert options.get_session_config_entry(ALLOW_SPINNING) == entry
    finally:
        s.close()
