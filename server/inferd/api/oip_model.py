"""What the Open Inference Protocol says about models: ModelMetadata, Triton's ModelConfig,
ModelStatistics and the repository index, built from the registry's ModelVersion values."""

from __future__ import annotations

from collections.abc import Iterable

from inferd.core.models.registry import LoadedVersion, ModelVersion
from inferd.core.models.triton_config import BACKEND, PLATFORM, TRITON_TYPE_NAMES
from inferd.core.statistics import Duration
from inferd.core.types import ModelState
from inferd_wire.proto.inference import grpc_service_pb2 as pb
from inferd_wire.proto.inference import model_config_pb2 as mc

# inferd's states -> the states Triton's repository index reports.
INDEX_STATES = {
    ModelState.UNKNOWN: "UNKNOWN",
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.UNLOADING: "UNLOADING",
    ModelState.UNLOADED: "UNAVAILABLE",
    ModelState.FAILED: "UNAVAILABLE",
}


def ready_versions(versions: Iterable[ModelVersion]) -> list[str]:
    return [str(v.version) for v in versions if v.state is ModelState.READY]


def model_metadata(target: LoadedVersion, versions: list[ModelVersion]) -> pb.ModelMetadataResponse:
    signature = target.signature
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=target.name,
        versions=ready_versions(versions),
        platform=PLATFORM,
        inputs=[
            tensor(name=s.name, datatype=s.datatype, shape=signature.full_shape(s))
            for s in signature.inputs
        ],
        outputs=[
            tensor(name=s.name, datatype=s.datatype, shape=signature.full_shape(s))
            for s in signature.outputs
        ],
    )


def model_config(target: LoadedVersion) -> mc.ModelConfig:
    """The configuration the version really runs with (config file, server defaults and the
    graph resolved), in Triton's terms."""
    signature, policy = target.signature, target.policy
    config = mc.ModelConfig(
        name=target.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=signature.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=TRITON_TYPE_NAMES[s.datatype], dims=s.dims)
            for s in signature.inputs
        ],
        output=[
            mc.ModelOutput(name=s.name, data_type=TRITON_TYPE_NAMES[s.datatype], dims=s.dims)
            for s in signature.outputs
        ],
        default_model_filename=target.path.name,
    )
    if signature.batches:
        batching = config.dynamic_batching
        batching.preferred_batch_size.extend(policy.preferred_batch_sizes)
        batching.max_queue_delay_microseconds = round(policy.max_queue_delay * 1e6)
        queue = batching.default_queue_policy
        queue.max_queue_size = policy.max_queue_size
        queue.default_timeout_microseconds = round((target.default_timeout or 0) * 1e6)
        queue.allow_timeout_override = True
    on_gpu = any(
        p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in target.providers
    )
    kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(name=target.name, kind=kind, count=policy.instances)
    version_policy = target.config.version_policy
    if version_policy.all:
        config.version_policy.all.SetInParent()
    elif version_policy.specific is not None:
        config.version_policy.specific.versions.extend(version_policy.specific)
    else:
        config.version_policy.latest.num_versions = version_policy.latest or 1
    return config


def _duration(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def model_statistics(version: ModelVersion) -> pb.ModelStatistics:
    s = version.statistics
    return pb.ModelStatistics(
        name=version.name,
        version=str(version.version),
        last_inference=s.last_inference_ns // 1_000_000,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.failure),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(b.compute_input),
                compute_infer=_duration(b.compute_infer),
                compute_output=_duration(b.compute_output),
            )
            for size, b in sorted(s.batch_stats.items())
        ],
    )


def index_entry(version: ModelVersion) -> pb.RepositoryIndexResponse.ModelIndex:
    return pb.RepositoryIndexResponse.ModelIndex(
        name=version.name,
        version=str(version.version),
        state=INDEX_STATES[version.state],
        reason=version.reason,
    )
