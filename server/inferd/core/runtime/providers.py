"""Provider options for the GPU execution providers, from a model's config.

The config's `provider_options` reach ONNX Runtime unchanged; inferd only adds what the user
left out and what its own execution fields imply:

- CUDA: `cudnn_conv_algo_search` HEURISTIC (ONNX Runtime's default, EXHAUSTIVE, searches again
  for every new input shape); `enable_cuda_graph` when the model's `cuda_graphs` is on.
- TensorRT: one optimisation profile spanning the batch buckets (min: the smallest, opt and
  max: the largest), so that the engine is built once at load for every shape the batcher can
  send, instead of again when a larger batch first arrives; `trt_cuda_graph_enable` with
  `cuda_graphs`.

TensorRT itself is not installed on any machine this project reaches: only this mapping is
tested, never an engine build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from inferd.core.types import TensorSpec

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROFILE_KEYS = ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")


def cuda_options(configured: Mapping[str, Any], cuda_graphs: bool) -> dict[str, Any]:
    options = dict(configured)
    options.setdefault("cudnn_conv_algo_search", "HEURISTIC")
    if cuda_graphs:
        options.setdefault("enable_cuda_graph", "1")
    return options


def tensorrt_options(
    configured: Mapping[str, Any],
    inputs: Sequence[TensorSpec],
    buckets: Sequence[int],
    cuda_graphs: bool,
) -> dict[str, Any]:
    """The configured options, plus a profile from the buckets unless the config gives one.
    `inputs` are the signature's (dims after the batch dim, config declarations applied). No
    profile is added when a non-batch dim is still variable: its range is unknown (declare the
    dims, or give `trt_profile_*_shapes` in the config)."""
    options = dict(configured)
    if cuda_graphs:
        options.setdefault("trt_cuda_graph_enable", "1")
    if buckets and not any(key in options for key in PROFILE_KEYS):
        profile = tensorrt_profile(inputs, min(buckets), max(buckets))
        if profile is not None:
            options.update(profile)
    return options


def tensorrt_profile(
    inputs: Sequence[TensorSpec], smallest: int, largest: int
) -> dict[str, str] | None:
    """`trt_profile_{min,opt,max}_shapes` for batches of smallest..largest rows, e.g.
    `input:1x3x224x224`; None when a non-batch dim is variable."""
    shapes: dict[str, list[str]] = {key: [] for key in PROFILE_KEYS}
    for tensor in inputs:
        if any(d < 0 for d in tensor.dims):
            return None
        dims = "x".join(str(d) for d in tensor.dims)
        for key, rows in zip(PROFILE_KEYS, (smallest, largest, largest), strict=True):
            shapes[key].append(f"{tensor.name}:{rows}x{dims}" if dims else f"{tensor.name}:{rows}")
    return {key: ",".join(values) for key, values in shapes.items()}


def device_id(providers: Sequence[tuple[str, Mapping[str, Any]]]) -> int:
    """The CUDA device the session runs on: the first GPU provider's `device_id`, else 0."""
    for name, options in providers:
        if name in (CUDA, TENSORRT):
            return int(options.get("device_id", 0))
    return 0
