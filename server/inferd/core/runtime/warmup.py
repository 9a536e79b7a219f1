"""Warm-up before READY: run every batch size the batcher can execute once, so the first real
requests do not pay for lazy initialisation (allocator growth, kernel selection per shape).

Inputs are the user's samples from `<model>/warmup/*.npz` (one request per file, arrays named
as the model's inputs), else zeros (variable non-batch dims set to 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from inferd.core.batching.batcher import BatchExecutor
from inferd.core.batching.policy import BatchingPolicy
from inferd.core.errors import InvalidInput
from inferd.core.types import Array, ModelSignature
from inferd_wire.codec import DTYPES

log = logging.getLogger(__name__)

WARMUP_DIR = "warmup"


def batch_sizes(policy: BatchingPolicy) -> list[int]:
    """1, the preferred sizes and the maximum: every size worth warming."""
    if policy.max_batch_size == 0:
        return [1]
    return sorted({1, *policy.preferred_batch_sizes, policy.max_batch_size})


def synthetic_request(signature: ModelSignature) -> dict[str, Array]:
    """One request of one row (if the model batches) filled with zeros."""
    inputs: dict[str, Array] = {}
    for spec in signature.inputs:
        shape = [d if d >= 0 else 1 for d in signature.full_shape(spec)]
        if spec.datatype == "BYTES":
            inputs[spec.name] = np.full(shape, "", dtype=object)
        else:
            inputs[spec.name] = np.zeros(shape, dtype=DTYPES[spec.datatype])
    return inputs


def load_samples(model_dir: Path, signature: ModelSignature) -> list[dict[str, Array]]:
    """The user's warm-up requests, checked against the signature. Blocks on file I/O."""
    directory = model_dir / WARMUP_DIR
    if not directory.is_dir():
        return []
    samples = []
    names = {s.name for s in signature.inputs}
    for path in sorted(directory.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            sample = {k: data[k] for k in data.files}
        if set(sample) != names:
            raise InvalidInput(
                f"{path}: holds arrays {sorted(sample)}; the model's inputs are {sorted(names)}"
            )
        for spec in signature.inputs:
            if spec.datatype == "BYTES":
                sample[spec.name] = sample[spec.name].astype(object)
        samples.append(sample)
    return samples


def _batch_of(rows: int, request: Mapping[str, Array], batches: bool) -> dict[str, Array]:
    if not batches:
        return dict(request)
    return {name: np.resize(a, (rows, *a.shape[1:])) for name, a in request.items()}


async def warm_up(
    executor: BatchExecutor,
    signature: ModelSignature,
    policy: BatchingPolicy,
    samples: Sequence[Mapping[str, Array]] = (),
) -> int:
    """Run each batch size once (each sample once more, as sent); returns runs made."""
    request = samples[0] if samples else synthetic_request(signature)
    runs = 0
    # A runtime that pads to batch buckets names the sizes it will really run.
    sizes = getattr(executor, "warmup_batch_sizes", batch_sizes)(policy)
    for rows in sizes:
        await executor.execute([_batch_of(rows, request, signature.batches)], ())
        runs += 1
    for sample in samples[1:]:
        await executor.execute([dict(sample)], ())
        runs += 1
    return runs
