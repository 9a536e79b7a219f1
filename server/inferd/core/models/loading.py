"""Loading one version's files into a `LoadedVersion`: the config merged over the server's
defaults (once: everything below takes the `EffectiveConfig`), the session (which derives the
signature), the batching policy, warm-up and the batcher, made in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from inferd.core.admission import RequestMemory
from inferd.core.batching.batcher import Batcher
from inferd.core.models.config import EffectiveConfig, ModelConfig, ModelDefaults
from inferd.core.models.repository import repository_relative
from inferd.core.models.version import LoadedVersion, ModelSession
from inferd.core.observer import MultiObserver, Observer
from inferd.core.runtime.session import OnnxRuntimeSession, resolve_providers
from inferd.core.runtime.warmup import load_samples, warm_up
from inferd.core.statistics import StatisticsRecorder, VersionStatistics

# (model file, its effective config, a name for logs and threads) -> an open session.
SessionFactory = Callable[[Path, EffectiveConfig, str], ModelSession]


def onnxruntime_session(path: Path, effective: EffectiveConfig, name: str) -> ModelSession:
    """The production session: providers, threads and slots from the effective config,
    execution fields (batch buckets, CUDA graphs, sessions per slot) applied by the runtime.
    Blocks: call it off the loop."""
    config = effective.config
    providers = resolve_providers(
        effective.execution_providers, config.provider_options, cuda_graphs=config.cuda_graphs
    )
    return OnnxRuntimeSession(
        path,
        providers,
        intra_op_threads=effective.intra_op_threads,
        instances=effective.instances,
        name=name,
        effective=effective,
    )


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
    session = await asyncio.to_thread(session_factory, path, effective, f"{name}-{number}")
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
        memory=RequestMemory.configured(
            name, effective.request_memory_factor, effective.max_request_bytes_in_flight
        ),
    )


def failure_reason(exc: BaseException, path: Path) -> str:
    """Why loading the model file at `path` (`<repository>/<model>/<version>/<file>`) failed,
    in one line, every path in it relative to the repository: the reason reaches clients
    (status, index, the Load RPC), and ONNX Runtime's own message names the absolute file."""
    message = getattr(exc, "message", None)
    text = message if isinstance(message, str) else f"loading {path} failed: {_first_line(exc)}"
    if path.is_absolute() and len(path.parents) > 2:
        return repository_relative(text, path.parents[2])
    return text


def _first_line(exc: BaseException) -> str:
    """ONNX Runtime's load errors run to many lines; the first names the problem."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)
