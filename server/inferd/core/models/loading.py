"""Loading one version's files into a `LoadedVersion`: the session (which derives the
signature), the batching policy, warm-up and the batcher, made in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from inferd.core.batching.batcher import Batcher
from inferd.core.batching.policy import BatchingPolicy
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.models.version import LoadedVersion, ModelSession
from inferd.core.observer import MultiObserver, Observer
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.core.runtime.warmup import load_samples, warm_up
from inferd.core.statistics import StatisticsRecorder, VersionStatistics
from inferd.core.types import ModelSignature

SessionFactory = Callable[[Path, ModelConfig, ModelDefaults, str], ModelSession]


def onnxruntime_session(
    path: Path, config: ModelConfig, defaults: ModelDefaults, name: str
) -> ModelSession:
    """The production session: providers from the config, execution fields (batch buckets,
    CUDA graphs, sessions per slot) applied by the runtime. Blocks: call it off the loop."""
    effective = EffectiveConfig.merge(config, defaults)
    providers = resolve_providers(
        effective.execution_providers, config.provider_options, cuda_graphs=config.cuda_graphs
    )
    return OnnxRuntimeSession(
        path,
        providers,
        intra_op_threads=effective.intra_op_threads,
        instances=effective.instances,
        name=name,
        config=config,
        defaults=defaults,
    )


def batching_policy(
    config: ModelConfig, signature: ModelSignature, defaults: ModelDefaults
) -> BatchingPolicy:
    """The batcher's policy: the model's config.toml over the server's defaults."""
    return EffectiveConfig.merge(config, defaults).batching_policy(signature)


async def load_files(
    name: str,
    number: int,
    path: Path,
    config: ModelConfig,
    defaults: ModelDefaults,
    session_factory: SessionFactory,
    observer: Observer,
    statistics: VersionStatistics,
) -> LoadedVersion:
    """Open, warm and wrap one version's files; `statistics` are kept by its batcher. Raises on
    any failure, leaving nothing open."""
    effective = EffectiveConfig.merge(config, defaults)
    session = await asyncio.to_thread(session_factory, path, config, defaults, f"{name}-{number}")
    try:
        signature = session.signature
        policy = effective.batching_policy(signature)
        samples = await asyncio.to_thread(load_samples, path.parent.parent, signature)
        await warm_up(session, signature, policy, samples)
    except BaseException:
        await asyncio.to_thread(session.close)
        raise
    return LoadedVersion(
        name=name,
        version=number,
        path=path,
        config=config,
        statistics=statistics,
        session=session,
        signature=signature,
        policy=policy,
        batcher=Batcher(
            name, number, policy, session, MultiObserver([observer, StatisticsRecorder(statistics)])
        ),
        default_timeout=effective.default_timeout,
        providers=session.providers,
    )
