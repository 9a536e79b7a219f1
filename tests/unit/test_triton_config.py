"""config.pbtxt (Triton's model configuration) -> inferd's ModelConfig, the check of declared
tensors against the ONNX graph, and the repository's choice between config.toml and
config.pbtxt."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from inferd.core.errors import InvalidInput
from inferd.core.models.config import (
    EffectiveConfig,
    ModelDefaults,
    TensorDeclaration,
    VersionPolicy,
)
from inferd.core.models.repository import ModelRepository
from inferd.core.models.signature import derive_signature
from inferd.core.models.triton_config import load_triton_config
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.demo_models import (
    build_mlp,
    build_text_encoder,
    write_model,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "triton_repository"

MLP_INPUTS = """
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 dims: [ 64 ] } ]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [ 10 ] } ]
"""


def _load(tmp_path: Path, text: str, model: str = "m"):
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    return load_triton_config(path, model)


def test_example_mlp_config_maps_every_supported_field():
    triton = load_triton_config(EXAMPLE / "mlp" / "config.pbtxt", "mlp")
    c = triton.config
    assert c.max_batch_size == 16
    assert c.preferred_batch_sizes == (4, 8)
    assert c.max_queue_delay_us == 500
    assert c.max_queue_size == 128
    assert c.default_timeout_us == 2_000_000
    assert c.instances == 2
    assert c.execution_providers == ("cpu",)
    assert c.version_policy == VersionPolicy(latest=1)
    assert triton.config.inputs == (TensorDeclaration(name="input", datatype="FP32", dims=(64,)),)
    assert triton.config.outputs == (
        TensorDeclaration(name="probabilities", datatype="FP32", dims=(10,)),
    )
    assert triton.unsupported == ()


def test_example_text_encoder_maps_gpu_group_priority_and_parameters():
    triton = load_triton_config(EXAMPLE / "text_encoder" / "config.pbtxt", "text_encoder")
    c = triton.config
    assert c.execution_providers == ("cuda", "cpu")
    assert c.provider_options == {"cuda": {"device_id": 0}}
    assert c.intra_op_threads == 1
    assert c.default_priority == 2
    assert triton.unsupported == ("model_warmup",)


def test_config_without_tensors_lets_the_graph_decide_batching(tmp_path: Path):
    triton = _load(tmp_path, 'backend: "onnxruntime"')
    assert triton.config.max_batch_size is None
    assert triton.config.inputs == ()


def test_batching_model_without_dynamic_batching_does_not_wait(tmp_path: Path):
    assert _load(tmp_path, MLP_INPUTS).config.max_queue_delay_us == 0


def test_max_batch_size_zero_with_tensors_turns_batching_off(tmp_path: Path):
    text = 'input [ { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] } ]'
    assert _load(tmp_path, text).config.max_batch_size == 0


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("version_policy: { all {} }", VersionPolicy(all=True)),
        ("version_policy: { specific { versions: [1, 3] } }", VersionPolicy(specific=(1, 3))),
        ("version_policy: { latest { num_versions: 2 } }", VersionPolicy(latest=2)),
        ("", VersionPolicy(latest=1)),
    ],
)
def test_version_policy(tmp_path: Path, text: str, policy: VersionPolicy):
    assert _load(tmp_path, text).config.version_policy == policy


def test_tensorrt_accelerator_goes_first(tmp_path: Path):
    text = """
    instance_group [ { kind: KIND_GPU count: 2 gpus: [ 1 ] } ]
    optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt" } ] } }
    """
    c = _load(tmp_path, text).config
    assert c.execution_providers == ("tensorrt", "cuda", "cpu")
    assert c.provider_options == {"cuda": {"device_id": 1}}
    assert c.instances == 2


def test_unsupported_fields_are_named_at_their_shallowest_level(tmp_path: Path):
    text = """
    max_batch_size: 4
    dynamic_batching {
      preserve_ordering: true
      default_queue_policy { timeout_action: DELAY max_queue_size: 3 }
    }
    optimization { cuda { graphs: true } }
    parameters { key: "enable_mem_pattern" value { string_value: "0" } }
    response_cache { enable: true }
    instance_group [ { kind: KIND_MODEL } ]
    """
    triton = _load(tmp_path, text)
    assert set(triton.unsupported) == {
        "dynamic_batching.preserve_ordering",
        "dynamic_batching.default_queue_policy.timeout_action: DELAY",
        "optimization.cuda",
        "parameters.enable_mem_pattern",
        "response_cache",
        "instance_group.kind: KIND_MODEL",
    }
    assert triton.config.max_queue_size == 3


def test_unsupported_fields_are_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "config.pbtxt"
    path.write_text(
        "model_warmup [ { name: 'w' batch_size: 1 } ]\nmetric_tags { key: 'a' value: 'b' }"
    )
    with caplog.at_level(logging.WARNING, logger="inferd.core.models.triton_config"):
        load_triton_config(path, "logged_once")
        load_triton_config(path, "logged_once")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "'logged_once'" in lines[0] and "metric_tags, model_warmup" in lines[0]


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ('platform: "tensorrt_plan"', ("'tensorrt_plan'", "onnxruntime_onnx")),
        ('backend: "python"', ("'python'", "onnxruntime")),
        ('name: "other"', ("'other'", "'m'")),
        ("max_batch_size: -1", ("max_batch_size -1",)),
        ("max_batch_size: 'eight'", ("config.pbtxt", "max_batch_size")),
        ("no_such_field: 1", ("no_such_field",)),
        ('parameters { key: "intra_op_thread_count" value { string_value: "x" } }',
         ("intra_op_thread_count", "'x'")),
        ("max_batch_size: 2 dynamic_batching { preferred_batch_size: [ 4 ] }",
         ("preferred_batch_sizes", "4")),
        ('input [ { name: "x" dims: [ 1 ] } ]', ("'x'", "data_type")),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_problem(tmp_path: Path, text: str, mentions: tuple[str, ...]):
    with pytest.raises(InvalidInput) as raised:
        _load(tmp_path, text)
    for text in mentions:
        assert text in raised.value.message


# --- the declared tensors against the graph (checked when the version loads) ------------------


def _signature(tmp_path: Path, text: str, build=build_mlp, name: str = "mlp"):
    triton = _load(tmp_path, text)
    session = OnnxRuntimeSession(
        write_model(build(), tmp_path, name), resolve_providers(["cpu"], {})
    )
    try:
        effective = EffectiveConfig.merge(triton.config, ModelDefaults())
        return derive_signature(session.inputs, session.outputs, effective)
    finally:
        session.close()


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        (MLP_INPUTS.replace('"input"', '"image"'), ("input 'image'", "['input']")),
        (MLP_INPUTS.replace("TYPE_FP32 dims: [ 64 ]", "TYPE_FP16 dims: [ 64 ]"),
         ("'input'", "FP16", "FP32")),
        (MLP_INPUTS.replace("[ 64 ]", "[ 32 ]"), ("'input'", "dim 0 is declared 32", "64")),
        (MLP_INPUTS.replace("[ 64 ]", "[ 8, 8 ]"), ("'input'", "rank 2")),
        (MLP_INPUTS.replace("[ 10 ]", "[ 10, 1 ]"), ("output 'probabilities'", "rank 2")),
        (MLP_INPUTS.replace("max_batch_size: 8", "max_batch_size: 0"), ("'input'", "rank 1")),
    ],
)  # fmt: skip
def test_declared_tensors_are_checked_against_the_graph(
    tmp_path: Path, text: str, mentions: tuple[str, ...]
):
    with pytest.raises(InvalidInput) as raised:
        _signature(tmp_path, text)
    for text in mentions:
        assert text in raised.value.message


def test_a_config_declaring_inputs_must_declare_all(tmp_path: Path):
    text = 'max_batch_size: 4 input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] } ]'
    with pytest.raises(InvalidInput, match=r"\['attention_mask'\] are not declared"):
        _signature(tmp_path, text, build_text_encoder, "text_encoder")


def test_declared_fixed_dims_narrow_variable_graph_dims(tmp_path: Path):
    text = """max_batch_size: 4
    input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ 16 ] },
            { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] } ]"""
    signature = _signature(tmp_path, text, build_text_encoder, "text_encoder")
    assert [s.dims for s in signature.inputs] == [(16,), (-1,)]
    assert signature.max_batch_size == 4


# --- the repository -----------------------------------------------------------------------------


def test_repository_reads_config_pbtxt(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_model(build_mlp(), tmp_path, "mlp")
    (tmp_path / "mlp" / "config.pbtxt").write_text(MLP_INPUTS)
    with caplog.at_level(logging.INFO, logger="inferd.core.models.repository"):
        sources, problems = ModelRepository(tmp_path).scan()
    assert problems == []
    assert sources[0].config.max_batch_size == 8
    assert any("config.pbtxt (Triton format)" in r.getMessage() for r in caplog.records)


def test_config_toml_wins_over_config_pbtxt(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    write_model(build_mlp(), tmp_path, "both", config_toml="max_batch_size = 3\n")
    (tmp_path / "both" / "config.pbtxt").write_text(MLP_INPUTS)
    with caplog.at_level(logging.INFO, logger="inferd.core.models.repository"):
        sources, _ = ModelRepository(tmp_path).scan()
    assert sources[0].config.max_batch_size == 3
    messages = [r.getMessage() for r in caplog.records]
    assert any("both config.toml and config.pbtxt: using" in m for m in messages), messages


def test_default_model_filename_is_honoured(tmp_path: Path):
    path = write_model(build_mlp(), tmp_path, "renamed")
    path.rename(path.with_name("mlp.onnx"))
    (tmp_path / "renamed" / "config.pbtxt").write_text('default_model_filename: "mlp.onnx"')
    sources, problems = ModelRepository(tmp_path).scan()
    assert problems == []
    assert sources[0].versions == {1: tmp_path / "renamed" / "1" / "mlp.onnx"}


def test_a_config_pbtxt_that_does_not_parse_skips_only_its_model(tmp_path: Path):
    write_model(build_mlp(), tmp_path, "good")
    write_model(build_mlp(), tmp_path, "bad")
    (tmp_path / "bad" / "config.pbtxt").write_text("max_batch_size: [ nonsense")
    sources, problems = ModelRepository(tmp_path).scan()
    assert [s.name for s in sources] == ["good"]
    assert [p.model for p in problems] == ["bad"]
    assert "not a valid Triton model configuration" in problems[0].reason
