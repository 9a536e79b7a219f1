"""Triton's model configuration, `<repository>/<model>/config.pbtxt`, read into inferd's
ModelConfig, so a Triton model repository of ONNX models serves unchanged.

The file is protobuf text format of `inference.ModelConfig` (protos/inference/model_config.proto,
field-for-field Triton's). What inferd understands is mapped; every other field that is set is
named once in the log and otherwise ignored (the model still serves). Declared inputs and outputs
are checked against the ONNX graph, read from the file's protobuf structure without loading the
model (a scan must not pay for a session).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from inferd.core.errors import InvalidInput
from inferd.core.models.config import (
    CpuMemoryArena,
    ModelConfig,
    TensorDeclaration,
    VersionPolicy,
)
from inferd_wire.proto.inference import model_config_pb2

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
DEFAULT_MODEL_FILENAME = "model.onnx"

# Triton's TYPE_* <-> the protocol's datatype names (TYPE_STRING is BYTES).
DATATYPES: dict[int, str] = {
    value.number: "BYTES" if value.name == "TYPE_STRING" else value.name.removeprefix("TYPE_")
    for value in model_config_pb2.DataType.DESCRIPTOR.values
    if value.name != "TYPE_INVALID"
}
TRITON_TYPE_NAMES = {name: model_config_pb2.DataType.Name(n) for n, name in DATATYPES.items()}

# Field paths (repeated fields without an index) that inferd maps or that change nothing here.
# `parameters` and the accelerators are checked entry by entry below.
_UNDERSTOOD = frozenset(
    """
    name platform backend max_batch_size default_model_filename
    input.name input.data_type input.dims input.format output.name output.data_type output.dims
    version_policy.latest.num_versions version_policy.all version_policy.specific.versions
    dynamic_batching.preferred_batch_size dynamic_batching.max_queue_delay_microseconds
    dynamic_batching.priority_levels dynamic_batching.default_priority_level
    dynamic_batching.default_queue_policy.max_queue_size
    dynamic_batching.default_queue_policy.default_timeout_microseconds
    dynamic_batching.default_queue_policy.allow_timeout_override
    dynamic_batching.default_queue_policy.timeout_action
    instance_group.name instance_group.count instance_group.kind instance_group.gpus
    optimization.execution_accelerators.gpu_execution_accelerator.name parameters
    """.split()
)
_ACCELERATORS = {"tensorrt"}
SHRINKAGE = "memory.enable_memory_arena_shrinkage"
_ARENA_PARAMETERS = {"enable_mem_arena", SHRINKAGE}
_BOOLEANS = {"1": True, "true": True, "0": False, "false": False}

_reported: set[tuple[str, tuple[str, ...]]] = set()


@dataclass(frozen=True, slots=True)
class TritonModelConfig:
    config: ModelConfig
    model_filename: str
    max_batch_size: int
    # Set fields inferd ignores, as paths ("optimization.cuda.graphs", "parameters.<key>").
    unsupported: tuple[str, ...]


def load_triton_config(path: Path, model: str) -> TritonModelConfig:
    """Read, validate and map a config.pbtxt. Blocks on file I/O: call it off the event loop."""
    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), message)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: not a valid Triton model configuration: {exc}") from None
    triton = triton_model_config(message, model, str(path))
    if triton.unsupported:
        key = (model, triton.unsupported)
        if key not in _reported:
            _reported.add(key)
            log.warning(
                "model '%s': %s sets fields inferd does not support (ignored): %s",
                model,
                path.name,
                ", ".join(triton.unsupported),
            )
    return triton


def triton_model_config(
    message: model_config_pb2.ModelConfig, model: str, where: str = "config.pbtxt"
) -> TritonModelConfig:
    """Map a parsed ModelConfig; `where` prefixes error messages."""
    platform, backend = message.platform, message.backend
    if platform not in ("", PLATFORM) or backend not in ("", BACKEND):
        raise InvalidInput(
            f"{where}: platform {platform!r} / backend {backend!r} is not served by inferd; "
            f"use platform '{PLATFORM}' or backend '{BACKEND}' (ONNX models)"
        )
    if message.name and message.name != model:
        raise InvalidInput(
            f"{where}: name '{message.name}' does not match the model directory '{model}'"
        )
    if message.max_batch_size < 0:
        raise InvalidInput(f"{where}: max_batch_size {message.max_batch_size} is negative")
    unsupported = dict.fromkeys(_unsupported_fields(message))
    fields: dict[str, Any] = {}
    # Triton completes a config that declares no tensors from the model itself: there, an unset
    # max_batch_size (0) lets the graph decide, as a missing key does in config.toml.
    if message.max_batch_size or message.input or message.output:
        fields["max_batch_size"] = message.max_batch_size
    if message.HasField("dynamic_batching"):
        fields.update(_dynamic_batching(message.dynamic_batching, unsupported))
    elif message.max_batch_size > 0:
        fields["max_queue_delay_us"] = 0
    fields.update(_instances(message, unsupported))
    for key, parameter in message.parameters.items():
        if key == "intra_op_thread_count":
            try:
                fields["intra_op_threads"] = int(parameter.string_value)
            except ValueError:
                raise InvalidInput(
                    f"{where}: parameters.intra_op_thread_count {parameter.string_value!r} "
                    "is not an integer"
                ) from None
        elif key not in _ARENA_PARAMETERS:
            unsupported[f"parameters.{key}"] = None
    arena = _cpu_memory_arena(message, unsupported, where)
    if arena is not None:
        fields["cpu_memory_arena"] = arena
    if message.HasField("version_policy"):
        fields["version_policy"] = _version_policy(message.version_policy)
    fields["inputs"] = tuple(_declared(t, where) for t in message.input)
    fields["outputs"] = tuple(_declared(t, where) for t in message.output)
    try:
        config = ModelConfig.model_validate(fields)
    except ValueError as exc:
        raise InvalidInput(f"{where}: {_first_error(exc)}") from None
    return TritonModelConfig(
        config=config,
        model_filename=message.default_model_filename or DEFAULT_MODEL_FILENAME,
        max_batch_size=message.max_batch_size,
        unsupported=tuple(unsupported),
    )


def _dynamic_batching(
    batching: model_config_pb2.ModelDynamicBatching, unsupported: dict[str, None]
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "preferred_batch_sizes": tuple(batching.preferred_batch_size),
        "max_queue_delay_us": batching.max_queue_delay_microseconds,
    }
    if batching.default_priority_level:
        fields["default_priority"] = batching.default_priority_level
    if batching.HasField("default_queue_policy"):
        policy = batching.default_queue_policy
        # 0 is Triton's "unbounded"; inferd's queues are always bounded (server default).
        if policy.max_queue_size:
            fields["max_queue_size"] = policy.max_queue_size
        fields["default_timeout_us"] = policy.default_timeout_microseconds
        if policy.timeout_action == model_config_pb2.ModelQueuePolicy.DELAY:
            unsupported["dynamic_batching.default_queue_policy.timeout_action: DELAY"] = None
    return fields


def _instances(
    message: model_config_pb2.ModelConfig, unsupported: dict[str, None]
) -> dict[str, Any]:
    """instance_group -> execution slots and providers; a GPU accelerator named tensorrt puts
    TensorRT first."""
    fields: dict[str, Any] = {}
    groups = message.instance_group
    kind = model_config_pb2.ModelInstanceGroup
    if groups:
        fields["instances"] = sum(max(g.count, 1) * max(len(g.gpus), 1) for g in groups)
    gpus = [gpu for g in groups for gpu in g.gpus]
    if len(set(gpus)) > 1:
        unsupported["instance_group.gpus (more than one GPU; the first is used)"] = None
    if any(g.kind == kind.KIND_MODEL for g in groups):
        unsupported["instance_group.kind: KIND_MODEL"] = None
    accelerators = message.optimization.execution_accelerators.gpu_execution_accelerator
    for accelerator in accelerators:
        if accelerator.name not in _ACCELERATORS:
            unsupported[f"gpu_execution_accelerator '{accelerator.name}'"] = None
    kinds = {g.kind for g in groups}
    if kinds and kinds <= {kind.KIND_CPU}:
        fields["execution_providers"] = ("cpu",)
    elif kind.KIND_GPU in kinds:
        fields["execution_providers"] = ("cuda", "cpu")
    if any(a.name == "tensorrt" for a in accelerators):
        fields["execution_providers"] = ("tensorrt", "cuda", "cpu")
    if gpus:
        fields["provider_options"] = {"cuda": {"device_id": gpus[0]}}
    return fields


def _cpu_memory_arena(
    message: model_config_pb2.ModelConfig, unsupported: dict[str, None], where: str
) -> CpuMemoryArena | None:
    """Triton's `enable_mem_arena` and `memory.enable_memory_arena_shrinkage` parameters as
    `cpu_memory_arena`; None when neither is set (the server's default applies, where Triton
    keeps ONNX Runtime's arena). Shrinking a GPU arena is not done by inferd."""
    parameters = message.parameters
    enabled: bool | None = None
    if "enable_mem_arena" in parameters:
        value = parameters["enable_mem_arena"].string_value.strip().lower()
        if value not in _BOOLEANS:
            raise InvalidInput(
                f"{where}: parameters.enable_mem_arena {value!r} is not one of 0, 1, false, true"
            )
        enabled = _BOOLEANS[value]
    shrink = False
    if SHRINKAGE in parameters:
        devices = [d.partition(":")[0] for d in parameters[SHRINKAGE].string_value.split(";")]
        shrink = "cpu" in devices
        if any(d and d != "cpu" for d in devices):
            unsupported[f"parameters.{SHRINKAGE} (gpu)"] = None
    if enabled is False:
        return "off"
    if shrink:
        return "shrink"
    return None if enabled is None else "keep"


def _version_policy(policy: model_config_pb2.ModelVersionPolicy) -> VersionPolicy:
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy(all=True)
    if choice == "specific":
        return VersionPolicy(specific=tuple(policy.specific.versions))
    return VersionPolicy(latest=max(policy.latest.num_versions, 1))


def _declared(
    tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput, where: str
) -> TensorDeclaration:
    datatype = DATATYPES.get(tensor.data_type)
    if datatype is None:
        raise InvalidInput(f"{where}: tensor '{tensor.name}' has no data_type")
    return TensorDeclaration(name=tensor.name, datatype=datatype, dims=tuple(tensor.dims))


def _unsupported_fields(message: Message, prefix: str = "") -> Iterator[str]:
    """Set fields outside _UNDERSTOOD, named at the shallowest level that inferd ignores whole
    (`model_warmup`, not each of its fields)."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if path in _UNDERSTOOD:
            continue
        nested = field.message_type is not None and not field.message_type.GetOptions().map_entry
        if not nested or not any(u.startswith(path + ".") for u in _UNDERSTOOD):
            yield path
            continue
        items = value if field.is_repeated else [value]
        yield from dict.fromkeys(p for item in items for p in _unsupported_fields(item, path + "."))


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(exc)
