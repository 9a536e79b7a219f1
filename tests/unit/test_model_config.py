"""config.toml parsing, version policies, signature derivation and model-name validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.core.errors import InvalidInput
from inferd.core.models.config import (
    EffectiveConfig,
    ModelConfig,
    ModelDefaults,
    VersionPolicy,
    load_model_config,
)
from inferd.core.models.repository import validate_model_name
from inferd.core.models.signature import GraphTensor, derive_signature, graph_batches
from inferd.core.models.triton_config import triton_model_config
from inferd.core.types import TensorSpec
from inferd_wire.proto.inference import model_config_pb2


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- load_model_config -----------------------------------------------------------------------


def test_missing_config_file_is_the_empty_config(tmp_path: Path) -> None:
    config = load_model_config(tmp_path / "config.toml")
    assert config == ModelConfig()
    assert config.max_batch_size is None
    assert config.version_policy.select([1, 2, 3]) == [3]


def test_empty_config_file_is_the_empty_config(tmp_path: Path) -> None:
    assert load_model_config(write_config(tmp_path, "")) == ModelConfig()


def test_valid_config_sets_every_field(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        max_batch_size = 16
        max_queue_delay_us = 500
        preferred_batch_sizes = [4, 8, 16]
        max_queue_size = 100
        instances = 2
        default_timeout_us = 250000
        default_priority = 3
        execution_providers = ["cuda", "cpu"]
        intra_op_threads = 4
        version_policy = { specific = [1, 3] }

        [provider_options.cuda]
        device_id = 1
        cudnn_conv_algo_search = "DEFAULT"
        """,
    )
    config = load_model_config(path)
    assert config.max_batch_size == 16
    assert config.max_queue_delay_us == 500
    assert config.preferred_batch_sizes == (4, 8, 16)
    assert config.max_queue_size == 100
    assert config.instances == 2
    assert config.default_timeout_us == 250000
    assert config.default_priority == 3
    assert config.execution_providers == ("cuda", "cpu")
    assert config.intra_op_threads == 4
    assert config.provider_options == {
        "cuda": {"device_id": 1, "cudnn_conv_algo_search": "DEFAULT"}
    }
    assert config.version_policy == VersionPolicy(specific=(1, 3))


def test_demo_mlp_config_is_valid(tmp_path: Path) -> None:
    from inferd.demo_models import CNN_CONFIG, MLP_CONFIG

    assert load_model_config(write_config(tmp_path, MLP_CONFIG)).max_batch_size == 64
    assert load_model_config(write_config(tmp_path, CNN_CONFIG)).max_queue_delay_us == 1000


def test_unknown_key_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "max_batch_size = 8\nmax_bacth_delay_us = 100\n")
    with pytest.raises(InvalidInput, match="max_bacth_delay_us") as info:
        load_model_config(path)
    assert str(path) in info.value.message


def test_unknown_nested_key_is_an_error_naming_its_path(tmp_path: Path) -> None:
    path = write_config(tmp_path, "version_policy = { latets = 2 }\n")
    with pytest.raises(InvalidInput, match=r"version_policy\.latets"):
        load_model_config(path)


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "max_batch_size = = 8\n")
    with pytest.raises(InvalidInput, match="not valid TOML"):
        load_model_config(path)


def test_preferred_batch_size_above_max_batch_size_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "max_batch_size = 8\npreferred_batch_sizes = [4, 16]\n")
    with pytest.raises(InvalidInput, match=r"preferred_batch_sizes: 16 exceeds max_batch_size 8"):
        load_model_config(path)


def test_preferred_batch_size_one_is_allowed_without_batching(tmp_path: Path) -> None:
    config = load_model_config(
        write_config(tmp_path, "max_batch_size = 0\npreferred_batch_sizes = [1]\n")
    )
    assert config.preferred_batch_sizes == (1,)
    with pytest.raises(InvalidInput, match="preferred_batch_sizes"):
        load_model_config(write_config(tmp_path, "max_batch_size = 0\npreferred_batch_sizes = [2]"))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("max_batch_size = -1", "max_batch_size"),
        ("instances = 0", "instances"),
        ("max_queue_size = 0", "max_queue_size"),
        ("default_priority = 0", "default_priority"),
        ("preferred_batch_sizes = [0]", "preferred_batch_sizes"),
        ("max_queue_delay_us = -5", "max_queue_delay_us"),
        ("max_batch_size = 'many'", "max_batch_size"),
        ("version_policy = { latest = 0 }", "version_policy.latest"),
    ],
)
def test_out_of_range_or_mistyped_value_is_an_error_naming_the_field(
    tmp_path: Path, text: str, field: str
) -> None:
    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        load_model_config(write_config(tmp_path, text + "\n"))


def test_cpu_memory_arena_parses_and_merges_over_the_server_default(tmp_path: Path) -> None:
    config = load_model_config(write_config(tmp_path, 'cpu_memory_arena = "keep"\n'))
    assert config.cpu_memory_arena == "keep"
    assert EffectiveConfig.merge(config, ModelDefaults()).cpu_memory_arena == "keep"
    empty = ModelConfig()
    assert empty.cpu_memory_arena is None
    # The measured default (docs/operations.md): no arena.
    assert EffectiveConfig.merge(empty, ModelDefaults()).cpu_memory_arena == "off"
    server = ModelDefaults(cpu_memory_arena="shrink")
    assert EffectiveConfig.merge(empty, server).cpu_memory_arena == "shrink"
    assert EffectiveConfig.merge(config, server).cpu_memory_arena == "keep"


def test_unknown_cpu_memory_arena_is_an_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cpu_memory_arena"):
        load_model_config(write_config(tmp_path, 'cpu_memory_arena = "sometimes"\n'))


@pytest.mark.parametrize(
    ("parameters", "arena", "unsupported"),
    [
        ({}, None, ()),
        ({"enable_mem_arena": "0"}, "off", ()),
        ({"enable_mem_arena": "false"}, "off", ()),
        ({"enable_mem_arena": "1"}, "keep", ()),
        ({"memory.enable_memory_arena_shrinkage": "cpu:0"}, "shrink", ()),
        ({"enable_mem_arena": "1", "memory.enable_memory_arena_shrinkage": "cpu:0"}, "shrink", ()),
        (
            {"memory.enable_memory_arena_shrinkage": "cpu:0;gpu:0"},
            "shrink",
            ("parameters.memory.enable_memory_arena_shrinkage (gpu)",),
        ),
        (
            {"memory.enable_memory_arena_shrinkage": "gpu:0"},
            None,
            ("parameters.memory.enable_memory_arena_shrinkage (gpu)",),
        ),
    ],
)
def test_triton_arena_parameters_map_to_cpu_memory_arena(
    parameters: dict[str, str], arena: str | None, unsupported: tuple[str, ...]
) -> None:
    message = model_config_pb2.ModelConfig()
    for key, value in parameters.items():
        message.parameters[key].string_value = value
    triton = triton_model_config(message, "m")
    assert triton.config.cpu_memory_arena == arena
    assert triton.unsupported == unsupported


def test_triton_enable_mem_arena_must_be_a_boolean() -> None:
    message = model_config_pb2.ModelConfig()
    message.parameters["enable_mem_arena"].string_value = "maybe"
    with pytest.raises(InvalidInput, match="enable_mem_arena"):
        triton_model_config(message, "m")


def test_version_policy_with_two_choices_is_an_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "version_policy = { latest = 2, all = true }\n")
    with pytest.raises(InvalidInput, match="one of latest, all, specific"):
        load_model_config(path)


# -- VersionPolicy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "available", "selected"),
    [
        ({"latest": 1}, [1, 2, 3], [3]),
        ({"latest": 2}, [3, 1, 2], [2, 3]),
        ({"latest": 5}, [2, 1], [1, 2]),
        ({"latest": 1}, [10, 9], [10]),
        ({"all": True}, [3, 1, 2], [1, 2, 3]),
        ({"specific": [1, 3]}, [1, 2, 3], [1, 3]),
        ({"specific": [1, 7]}, [1, 2, 3], [1]),
        ({"specific": [7]}, [1, 2, 3], []),
        # None chosen: the newest one.
        ({}, [1, 2, 3], [3]),
        ({"all": False}, [1, 2], [2]),
    ],
)
def test_version_policy_selects_versions_ascending(
    policy: dict[str, object], available: list[int], selected: list[int]
) -> None:
    assert VersionPolicy.model_validate(policy).select(available) == selected


def test_version_policy_selects_nothing_from_nothing() -> None:
    assert VersionPolicy(latest=3).select([]) == []
    assert VersionPolicy(all=True).select([]) == []


# -- derive_signature ------------------------------------------------------------------------

DEFAULTS = ModelDefaults(max_batch_size=32)


def effective(**fields: object) -> EffectiveConfig:
    """A config with these fields merged over DEFAULTS, as a load merges it."""
    return EffectiveConfig.merge(ModelConfig.model_validate(fields), DEFAULTS)


def tensor(name: str, *shape: int | str | None, ort_type: str = "tensor(float)") -> GraphTensor:
    return GraphTensor(name, ort_type, tuple(shape))


def test_batch_dim_is_derived_when_every_tensor_has_a_variable_dim_0() -> None:
    inputs = [tensor("x", "batch", 64), tensor("ids", None, "seq", ort_type="tensor(int64)")]
    outputs = [tensor("y", -1, 10)]
    assert graph_batches(inputs, outputs)
    signature = derive_signature(inputs, outputs, effective())
    assert signature.max_batch_size == 32
    assert signature.batches
    assert signature.inputs == (TensorSpec("x", "FP32", (64,)), TensorSpec("ids", "INT64", (-1,)))
    assert signature.outputs == (TensorSpec("y", "FP32", (10,)),)
    assert signature.full_shape(signature.inputs[0]) == (-1, 64)


def test_config_max_batch_size_overrides_the_default() -> None:
    signature = derive_signature(
        [tensor("x", "n", 4)], [tensor("y", "n", 4)], effective(max_batch_size=8)
    )
    assert signature.max_batch_size == 8


def test_config_max_batch_size_zero_turns_batching_off() -> None:
    signature = derive_signature(
        [tensor("x", "n", 4)], [tensor("y", "n", 4)], effective(max_batch_size=0)
    )
    assert signature.max_batch_size == 0
    assert signature.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    assert signature.full_shape(signature.inputs[0]) == (-1, 4)


def test_fixed_dim_0_on_any_tensor_means_no_batch_dim() -> None:
    inputs = [tensor("x", "batch", 64)]
    outputs = [tensor("y", "batch", 10), tensor("stats", 2, 10)]
    assert not graph_batches(inputs, outputs)
    signature = derive_signature(inputs, outputs, effective())
    assert signature.max_batch_size == 0
    assert not signature.batches
    assert signature.inputs == (TensorSpec("x", "FP32", (-1, 64)),)
    assert signature.outputs[1] == TensorSpec("stats", "FP32", (2, 10))


def test_scalar_tensor_means_no_batch_dim() -> None:
    signature = derive_signature([tensor("x", "n")], [tensor("total")], effective())
    assert signature.max_batch_size == 0
    assert signature.outputs == (TensorSpec("total", "FP32", ()),)


def test_config_max_batch_size_with_a_fixed_dim_0_is_an_error_naming_the_tensor() -> None:
    with pytest.raises(InvalidInput, match=r"max_batch_size is 8 but tensor 'y'.*\[3, 10\]"):
        derive_signature(
            [tensor("x", "batch", 64)],
            [tensor("y", 3, 10)],
            effective(max_batch_size=8),
        )


def test_config_max_batch_size_with_a_scalar_tensor_is_an_error() -> None:
    with pytest.raises(InvalidInput, match="tensor 'total'"):
        derive_signature([tensor("x", "n")], [tensor("total")], effective(max_batch_size=4))


def test_unsupported_tensor_type_is_an_error_naming_the_tensor() -> None:
    with pytest.raises(
        InvalidInput, match=r"tensor 'seq' has unsupported type tensor\(complex64\)"
    ):
        derive_signature(
            [tensor("seq", "n", ort_type="tensor(complex64)")],
            [tensor("y", "n")],
            effective(),
        )


@pytest.mark.parametrize(
    ("ort_type", "datatype"),
    [
        ("tensor(float)", "FP32"),
        ("tensor(float16)", "FP16"),
        ("tensor(bfloat16)", "BF16"),
        ("tensor(double)", "FP64"),
        ("tensor(int8)", "INT8"),
        ("tensor(uint8)", "UINT8"),
        ("tensor(int64)", "INT64"),
        ("tensor(bool)", "BOOL"),
        ("tensor(string)", "BYTES"),
    ],
)
def test_onnx_types_map_to_wire_datatypes(ort_type: str, datatype: str) -> None:
    signature = derive_signature(
        [tensor("a", "n", ort_type=ort_type)], [tensor("b", "n")], effective()
    )
    assert signature.inputs[0].datatype == datatype


def test_symbolic_non_batch_dims_are_variable() -> None:
    signature = derive_signature(
        [tensor("ids", "batch", "sequence", None, 7)],
        [tensor("y", "batch")],
        effective(),
    )
    assert signature.inputs[0].dims == (-1, -1, 7)
    assert signature.input("ids") is signature.inputs[0]
    assert signature.input("nope") is None


# -- validate_model_name ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        ".",
        "a/b",
        "a\\b",
        ".hidden",
        "a..b",
        "v1..",
        "-x",
        "_x",
        "a b",
        "mlp\n",
        "é",
        "x" * 129,
    ],
)
def test_invalid_model_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidInput, match="model name"):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["mlp", "text_encoder", "v1.2-x", "A", "9lives", "x" * 128])
def test_valid_model_names_are_accepted(name: str) -> None:
    validate_model_name(name)
