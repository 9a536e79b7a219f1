"""Provider selection and provider options: what inferd asks ONNX Runtime for.

No GPU here: `cuda_usable()` is false, so GPU providers are skipped. With it patched true,
the provider list and options are checked as built; where a session must be created, only
`onnxruntime.InferenceSession` is replaced (recording what it was asked for, then loading the
model on the CPU). TensorRT is installed on no machine this project reaches: its options are
tested as a mapping only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from inferd.core.errors import InvalidInput
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.models.registry import onnxruntime_session
from inferd.core.runtime import session
from inferd.core.runtime.providers import (
    cuda_options,
    device_id,
    tensorrt_options,
    tensorrt_profile,
)
from inferd.core.runtime.session import OnnxRuntimeSession, cuda_usable, resolve_providers
from inferd.core.types import TensorSpec
from inferd.demo_models import build_cnn, build_mlp, build_text_encoder, write_model

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"


@pytest.fixture
def gpu_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "cuda_usable", lambda: True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("provider-models")
    write_model(build_mlp(), root, "mlp")
    write_model(build_cnn(), root, "cnn")
    write_model(build_text_encoder(), root, "text_encoder")
    return root


# -- selection ---------------------------------------------------------------------------------


def test_no_usable_gpu_here_so_cuda_is_skipped_for_cpu() -> None:
    assert cuda_usable() is False
    assert resolve_providers(["tensorrt", "cuda", "cpu"], {"cuda": {"device_id": 1}}) == [
        (CPU_EP, {})
    ]


def test_cpu_is_added_as_the_fallback(gpu_present: None) -> None:
    assert [name for name, _ in resolve_providers(["cuda"], {})] == [CUDA_EP, CPU_EP]


def test_with_a_gpu_the_preference_order_is_kept(gpu_present: None) -> None:
    providers = resolve_providers(["TensorRT", "cuda", "cpu"], {})
    assert [name for name, _ in providers] == [TRT_EP, CUDA_EP, CPU_EP]


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="execution provider 'rocm' is unknown"):
        resolve_providers(["rocm"], {})


# -- CUDA options ------------------------------------------------------------------------------


def test_cuda_gets_heuristic_conv_search_by_default(gpu_present: None) -> None:
    (cuda, _), *_ = resolve_providers(["cuda"], {})
    assert cuda == CUDA_EP
    assert resolve_providers(["cuda"], {})[0][1] == {"cudnn_conv_algo_search": "HEURISTIC"}


def test_cuda_options_from_config_pass_through_unchanged(gpu_present: None) -> None:
    configured = {
        "device_id": 1,
        "gpu_mem_limit": 8 * 1024**3,
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": True,
    }
    (_, options), cpu = resolve_providers(["cuda", "cpu"], {"cuda": configured, "cpu": {}})
    assert options == configured
    assert cpu == (CPU_EP, {})


def test_cuda_graphs_turn_on_the_cuda_providers_graph_option(gpu_present: None) -> None:
    (_, options), _ = resolve_providers(["cuda"], {"cuda": {"device_id": 0}}, cuda_graphs=True)
    assert options == {
        "device_id": 0,
        "cudnn_conv_algo_search": "HEURISTIC",
        "enable_cuda_graph": "1",
    }


def test_cuda_graph_option_from_config_wins() -> None:
    assert cuda_options({"enable_cuda_graph": "0"}, cuda_graphs=True)["enable_cuda_graph"] == "0"


def test_device_id_is_the_first_gpu_providers() -> None:
    assert device_id([(TRT_EP, {"device_id": 2}), (CUDA_EP, {"device_id": 3})]) == 2
    assert device_id([(CUDA_EP, {"device_id": "1"}), (CPU_EP, {})]) == 1
    assert device_id([(CPU_EP, {})]) == 0


# -- TensorRT options --------------------------------------------------------------------------

IMAGE = TensorSpec("image", "FP32", (3, 224, 224))
MASK = TensorSpec("mask", "INT64", (128,))


def test_tensorrt_options_from_config_pass_through_unchanged() -> None:
    configured = {
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": "/var/cache/inferd/trt",
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": "/var/cache/inferd/timing",
        "device_id": 0,
    }
    options = tensorrt_options(configured, [IMAGE], (), cuda_graphs=False)
    assert options == configured


def test_tensorrt_profile_spans_the_buckets() -> None:
    options = tensorrt_options({}, [IMAGE, MASK], (1, 2, 4, 8, 16), cuda_graphs=False)
    assert options == {
        "trt_profile_min_shapes": "image:1x3x224x224,mask:1x128",
        "trt_profile_opt_shapes": "image:16x3x224x224,mask:16x128",
        "trt_profile_max_shapes": "image:16x3x224x224,mask:16x128",
    }


def test_tensorrt_profile_from_config_is_not_replaced() -> None:
    configured = {"trt_profile_min_shapes": "image:4x3x224x224"}
    options = tensorrt_options(configured, [IMAGE], (1, 8), cuda_graphs=True)
    assert options == {**configured, "trt_cuda_graph_enable": "1"}


def test_no_tensorrt_profile_when_a_non_batch_dim_is_variable() -> None:
    sequence = TensorSpec("input_ids", "INT64", (-1,))
    assert tensorrt_profile([sequence], 1, 8) is None
    assert tensorrt_options({}, [sequence], (1, 8), cuda_graphs=False) == {}


def test_tensorrt_profile_of_a_vector_input() -> None:
    assert tensorrt_profile([TensorSpec("x", "FP32", ())], 2, 4) == {
        "trt_profile_min_shapes": "x:2",
        "trt_profile_opt_shapes": "x:4",
        "trt_profile_max_shapes": "x:4",
    }


# -- what the session asks ONNX Runtime for -----------------------------------------------------


def merged(config: ModelConfig) -> EffectiveConfig:
    return EffectiveConfig.merge(config, ModelDefaults())


class RecordedSessions:
    def __init__(self) -> None:
        self.calls: list[list[tuple[str, dict[str, Any]]]] = []


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch, gpu_present: None) -> Iterator[RecordedSessions]:
    """ONNX Runtime sessions that record the providers asked for, then load on the CPU."""
    record = RecordedSessions()
    real = ort.InferenceSession

    def fake(
        path: str,
        sess_options: ort.SessionOptions | None = None,
        providers: list[str] | None = None,
        provider_options: list[dict[str, Any]] | None = None,
    ) -> ort.InferenceSession:
        names = providers or []
        options = provider_options or [{} for _ in names]
        record.calls.append(list(zip(names, options, strict=True)))
        return real(path, sess_options=sess_options, providers=[CPU_EP])

    monkeypatch.setattr(session.ort, "InferenceSession", fake)
    yield record


def test_session_asks_for_cuda_with_its_options(repo: Path, recorded: RecordedSessions) -> None:
    config = ModelConfig(
        execution_providers=("cuda", "cpu"),
        provider_options={"cuda": {"device_id": 0, "gpu_mem_limit": 1 << 30}},
        max_batch_size=8,
        instances=2,
    )
    s = onnxruntime_session(repo / "mlp" / "1" / "model.onnx", merged(config), "mlp-1")
    try:
        assert recorded.calls == [
            [
                (
                    CUDA_EP,
                    {
                        "device_id": 0,
                        "gpu_mem_limit": 1 << 30,
                        "cudnn_conv_algo_search": "HEURISTIC",
                    },
                ),
                (CPU_EP, {}),
            ]
        ]
    finally:
        s.close()


def test_tensorrt_session_is_built_with_a_profile_from_the_buckets(
    repo: Path, recorded: RecordedSessions
) -> None:
    config = ModelConfig(
        execution_providers=("tensorrt", "cuda", "cpu"),
        provider_options={"tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_enable": True}},
        max_batch_size=16,
        batch_buckets=(2, 8),
    )
    s = onnxruntime_session(repo / "cnn" / "1" / "model.onnx", merged(config), "cnn-1")
    try:
        # First a CPU read of the graph (the profile needs its inputs), then the real session.
        assert recorded.calls[0] == [(CPU_EP, {})]
        (trt, trt_options), (cuda, _), (cpu, _) = recorded.calls[1]
        assert (trt, cuda, cpu) == (TRT_EP, CUDA_EP, CPU_EP)
        assert trt_options == {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_profile_min_shapes": "image:2x3x64x64",
            "trt_profile_opt_shapes": "image:16x3x64x64",
            "trt_profile_max_shapes": "image:16x3x64x64",
        }
        assert s.buckets == (2, 8, 16)
    finally:
        s.close()


def test_tensorrt_profile_takes_declared_dims(repo: Path, recorded: RecordedSessions) -> None:
    config = ModelConfig.model_validate(
        {
            "execution_providers": ["tensorrt", "cpu"],
            "max_batch_size": 4,
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "dims": [32]},
                {"name": "attention_mask", "datatype": "INT64", "dims": [32]},
            ],
        }
    )
    path = repo / "text_encoder" / "1" / "model.onnx"
    s = onnxruntime_session(path, merged(config), "text-1")
    try:
        trt_options = recorded.calls[1][0][1]
        assert trt_options["trt_profile_max_shapes"] == "input_ids:4x32,attention_mask:4x32"
        assert trt_options["trt_profile_min_shapes"] == "input_ids:1x32,attention_mask:1x32"
    finally:
        s.close()


def test_cuda_graphs_need_fixed_input_dims() -> None:
    signature_inputs = (TensorSpec("input_ids", "INT64", (-1,)),)
    from inferd.core.runtime.session import _require_graphable
    from inferd.core.types import ModelSignature

    with pytest.raises(InvalidInput, match="input 'input_ids' has dims \\[-1\\]"):
        _require_graphable(ModelSignature(signature_inputs, (), 8), (1, 8))
    with pytest.raises(InvalidInput, match="needs batch buckets"):
        _require_graphable(ModelSignature((IMAGE,), (), 8), ())
    _require_graphable(ModelSignature((IMAGE,), (), 8), (1, 8))


def test_cpu_only_session_is_unchanged_by_gpu_options(repo: Path) -> None:
    s = OnnxRuntimeSession(
        repo / "mlp" / "1" / "model.onnx",
        resolve_providers(["cuda", "cpu"], {"cuda": {"device_id": 0}}),
        effective=merged(ModelConfig(max_batch_size=8, cuda_graphs=True)),
    )
    try:
        assert s.providers == (CPU_EP,)
        assert s.buckets == ()
    finally:
        s.close()
