"""A model's configuration: `<repository>/<model>/config.toml`, every field optional.

Fields left out fall back to the server's defaults (`ModelDefaults`, the server config's
`models` table) or to what the ONNX graph declares; `EffectiveConfig.merge` applies the
defaults, once per load. Unknown keys are an error naming the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferd.core.batching.policy import BatchingPolicy
from inferd.core.errors import InvalidInput
from inferd.core.types import ModelSignature

ProviderOptions = dict[str, str | int | float | bool]
CpuMemoryArena = Literal["shrink", "keep", "off"]


class VersionPolicy(BaseModel):
    """Which versions of a model are served: the newest `latest`, `all`, or a `specific` list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: Annotated[int, Field(ge=1)] | None = None
    all: bool = False
    specific: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.all, self.specific is not None]
        if sum(chosen) > 1:
            raise ValueError("version_policy takes one of latest, all, specific")
        if not any(chosen):
            return VersionPolicy(latest=1)
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those on disk, ascending."""
        ordered = sorted(available)
        if self.all:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        return ordered[-(self.latest or 1) :]


class TensorDeclaration(BaseModel):
    """An input or output as the config declares it (Triton's `input`/`output`): checked
    against the graph at load; a fixed dim where the graph's is variable is enforced on every
    request. `dims` exclude the batch dim when the model batches; -1 is variable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    datatype: str
    dims: tuple[int, ...]


class ModelConfig(BaseModel):
    """What `config.toml` may say. None means: use the server default or the graph."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: Annotated[int, Field(ge=0)] | None = None
    """Most rows per executed batch; 0 turns batching off (dim 0 is then not a batch dim).
    Default: the server's default when every input and output has a variable dim 0, else 0."""

    max_queue_delay_us: Annotated[int, Field(ge=0)] | None = None
    """How long (µs) the oldest request may wait for its batch to fill. See BatchingPolicy."""

    preferred_batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] = ()
    """Batch sizes dispatched as soon as they can be formed."""

    adaptive_delay: bool = True
    """Dispatch before max_queue_delay runs out when no further request is expected within it.
    See BatchingPolicy."""

    max_queue_size: Annotated[int, Field(ge=1)] | None = None
    """Requests that may wait before new ones get RESOURCE_EXHAUSTED."""

    instances: Annotated[int, Field(ge=1)] | None = None
    """Batches executing at once (execution slots)."""

    default_timeout_us: Annotated[int, Field(ge=0)] | None = None
    """Timeout (µs) for requests that carry neither a timeout nor a gRPC deadline; 0: none."""

    default_priority: Annotated[int, Field(ge=1)] = 1
    """The priority level of requests that name none; smaller levels run first."""

    execution_providers: tuple[str, ...] | None = None
    """Order of preference, e.g. ["cuda", "cpu"]; an unusable provider is skipped."""

    provider_options: dict[str, ProviderOptions] = Field(default_factory=dict)
    """Options per provider, passed to ONNX Runtime unchanged, e.g. {cuda = {device_id = 0}}."""

    intra_op_threads: Annotated[int, Field(ge=0)] | None = None
    """ONNX Runtime intra-op threads; 0: one per physical core (ORT's default)."""

    cpu_memory_arena: CpuMemoryArena | None = None
    """What ONNX Runtime's CPU memory arena does with host memory a run no longer needs.
    "keep": the arena holds it for later runs, for the life of the session, so one large
    request leaves its whole working set resident; "shrink": the arena's free regions are
    returned after each run; "off": no arena, each tensor is allocated and freed on its own.
    Measured on the demo models (docs/operations.md, "Memory held by ONNX Runtime"): "off"
    returns a large request's memory at no cost to small batches, "shrink" returns it too but
    costs small batches ~10%, "keep" runs the same large request again 4x faster. Host memory
    only: device (CUDA) memory is the CUDA provider's (`provider_options.cuda`)."""

    intra_op_spinning: bool | None = None
    """Whether ONNX Runtime's intra-op threads spin (busy-wait) between runs instead of
    sleeping. Spinning buys throughput when runs follow each other closely (closed loop on the
    demo models, 2 cores: +10-18% mlp, +4-9% cnn) and costs the event loop the CPU it burns, which
    shows under overload: cnn at 3x its peak refused requests with p99 63 ms without spinning
    against 288-1,243 ms with it (docs/benchmarks.md, "Overload"). Turn it off where cores are
    few and overload is expected."""

    request_memory_factor: Annotated[float, Field(ge=1.0)] | None = None
    """Memory a request is expected to hold while queued and executing, as a multiple of its
    input bytes (its activations and outputs included): what admission control charges it.
    1 counts the inputs only; a model whose working memory grows faster than its input (a
    transformer's attention grows with the square of the sequence) wants the factor measured
    at the largest request it should accept (docs/operations.md, "Limits")."""

    max_request_bytes_in_flight: Annotated[int, Field(ge=0)] | None = None
    """Estimated bytes (request_memory_factor x input bytes) the model's requests in flight may
    hold together; past it RESOURCE_EXHAUSTED at once. 0: only the server's own budget."""

    batch_buckets: tuple[Annotated[int, Field(ge=1)], ...] | None = None
    """Batch sizes executed: a batch runs zero-padded up to the smallest bucket that holds it
    (max_batch_size is always one), so only these shapes ever run, each warmed at load, and
    padding rows never reach a client. Costs the padding rows' compute; buys no stall on a
    first run at a new shape, and makes CUDA graphs possible. None: powers of two up to
    max_batch_size on a GPU, no padding on the CPU (where compute grows with rows); [] turns
    padding off everywhere."""

    cuda_graphs: bool = False
    """Capture one CUDA graph per batch bucket at load and replay it (CUDA provider only; every
    input's non-batch dims must be fixed). Cuts the per-run launch cost (ResNet-50 batch 1 on
    an H100: 0.86 ms instead of 2.28 ms); costs a session, device buffers per bucket and load
    time per execution slot. See docs/gpu.md for the restrictions."""

    session_per_instance: bool = False
    """One ONNX Runtime session per execution slot, instead of one shared by all slots. Costs
    the weights' memory once per slot; measured on an H100 (ResNet-50, batch 32, 4 threads):
    5,524 img/s shared vs 5,437 per slot, so shared is the default. Implied by cuda_graphs."""

    version_policy: VersionPolicy = Field(default_factory=lambda: VersionPolicy(latest=1))

    inputs: tuple[TensorDeclaration, ...] = ()
    """Declared inputs; empty: the graph's. When given, every graph input must be declared."""

    outputs: tuple[TensorDeclaration, ...] = ()
    """Declared outputs (a subset of the graph's is fine)."""

    @model_validator(mode="after")
    def _preferred_within_max(self) -> ModelConfig:
        if self.max_batch_size is not None:
            for size in self.preferred_batch_sizes:
                if size > max(self.max_batch_size, 1):
                    raise ValueError(
                        f"preferred_batch_sizes: {size} exceeds max_batch_size "
                        f"{self.max_batch_size}"
                    )
        return self

    @model_validator(mode="after")
    def _buckets_within_max(self) -> ModelConfig:
        if self.max_batch_size is not None and self.batch_buckets:
            for size in self.batch_buckets:
                if size > max(self.max_batch_size, 1):
                    raise ValueError(
                        f"batch_buckets: {size} exceeds max_batch_size {self.max_batch_size}"
                    )
        return self


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a config.toml; a missing file is the empty config."""
    if not path.is_file():
        return ModelConfig()
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
        return ModelConfig.model_validate(raw)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidInput(f"{path}: {problems}") from None


class ModelDefaults(BaseModel):
    """Server-wide defaults for what a model's config.toml leaves out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: Annotated[int, Field(ge=0)] = 32
    """Used when the graph has a variable dim 0 on every input and output."""
    max_queue_delay_us: Annotated[int, Field(ge=0)] = 0
    """0: no waiting for batches to fill; they still form while every slot is busy."""
    max_queue_size: Annotated[int, Field(ge=1)] = 1024
    instances: Annotated[int, Field(ge=1)] = 1
    default_timeout_us: Annotated[int, Field(ge=0)] = 0
    execution_providers: tuple[str, ...] = ("cuda", "cpu")
    intra_op_threads: Annotated[int, Field(ge=0)] = 0
    cpu_memory_arena: CpuMemoryArena = "off"
    """See ModelConfig.cpu_memory_arena: "off" returned a large request's memory at no measured
    cost to small batches (docs/operations.md)."""
    request_memory_factor: Annotated[float, Field(ge=1.0)] = 1.0
    max_request_bytes_in_flight: Annotated[int, Field(ge=0)] = 0
    intra_op_spinning: bool = True


@dataclass(frozen=True, slots=True)
class EffectiveConfig:
    """What one model version runs with: its config.toml over the server's defaults, merged in
    this one place, once per load (`models/loading.py`), and handed down from there: nothing
    below the load sees `ModelDefaults`. The resolved max_batch_size is not here: whether the
    default applies depends on the graph, so it is the signature's (`derive_signature`)."""

    config: ModelConfig
    """The model's config as written: declarations, execution fields, version policy."""
    default_max_batch_size: int
    """The server's max_batch_size, for a config that gives none. Only a candidate: the
    signature applies it when every input and output has a variable dim 0, else uses 0."""
    max_queue_delay_us: int
    max_queue_size: int
    instances: int
    default_timeout_us: int
    execution_providers: tuple[str, ...]
    intra_op_threads: int
    cpu_memory_arena: CpuMemoryArena
    request_memory_factor: float
    max_request_bytes_in_flight: int
    intra_op_spinning: bool

    @classmethod
    def merge(cls, config: ModelConfig, defaults: ModelDefaults) -> EffectiveConfig:
        return cls(
            config=config,
            default_max_batch_size=defaults.max_batch_size,
            max_queue_delay_us=(
                defaults.max_queue_delay_us
                if config.max_queue_delay_us is None
                else config.max_queue_delay_us
            ),
            max_queue_size=config.max_queue_size or defaults.max_queue_size,
            instances=config.instances or defaults.instances,
            default_timeout_us=(
                defaults.default_timeout_us
                if config.default_timeout_us is None
                else config.default_timeout_us
            ),
            # An empty list in the config means "not given", as it always has.
            execution_providers=config.execution_providers or defaults.execution_providers,
            intra_op_threads=(
                defaults.intra_op_threads
                if config.intra_op_threads is None
                else config.intra_op_threads
            ),
            cpu_memory_arena=config.cpu_memory_arena or defaults.cpu_memory_arena,
            intra_op_spinning=(
                defaults.intra_op_spinning
                if config.intra_op_spinning is None
                else config.intra_op_spinning
            ),
            request_memory_factor=(
                defaults.request_memory_factor
                if config.request_memory_factor is None
                else config.request_memory_factor
            ),
            max_request_bytes_in_flight=(
                defaults.max_request_bytes_in_flight
                if config.max_request_bytes_in_flight is None
                else config.max_request_bytes_in_flight
            ),
        )

    @property
    def default_timeout(self) -> float | None:
        """Seconds for requests that carry neither a timeout nor a deadline; None: no limit."""
        return self.default_timeout_us / 1e6 if self.default_timeout_us else None

    def batching_policy(self, signature: ModelSignature) -> BatchingPolicy:
        """The batcher's policy for this version; raises ValueError when the config's batching
        fields cannot apply to the graph (e.g. a preferred size above max_batch_size)."""
        return BatchingPolicy(
            max_batch_size=signature.max_batch_size,
            max_queue_delay=self.max_queue_delay_us / 1e6,
            preferred_batch_sizes=self.config.preferred_batch_sizes if signature.batches else (),
            max_queue_size=self.max_queue_size,
            instances=self.instances,
            default_priority=self.config.default_priority,
            adaptive_delay=self.config.adaptive_delay,
        )
