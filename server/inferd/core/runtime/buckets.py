"""Batch buckets: the few batch sizes a model version ever executes.

A batch of n rows runs padded up to the smallest bucket that holds it, so the runtime only ever
sees those shapes: each is warmed (and, on CUDA, may be captured as a CUDA graph) at load, and
no request pays for a first run at a new shape (ONNX Runtime's kernel choice, allocator growth,
cuDNN's algorithm search). The cost is the padding rows' compute: worth it on a GPU, where a
batch of 5 costs about what a batch of 8 does; not by default on the CPU, where compute grows
with rows.

The padding rows are zeros and never reach a client: outputs are sliced back to the real rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from inferd.core.types import Array


def default_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to max_batch_size, plus max_batch_size itself: 1, 2, 4, ..., max."""
    if max_batch_size <= 0:
        return ()
    sizes = {1 << k for k in range(max_batch_size.bit_length()) if 1 << k <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def resolve_buckets(
    configured: Sequence[int] | None, max_batch_size: int, on_gpu: bool
) -> tuple[int, ...]:
    """The buckets a session pads to; () means no padding.

    `configured` None: the default on a GPU, none on the CPU. An empty list turns padding off.
    max_batch_size is always added as the last bucket, so that every batch the batcher can
    form has one."""
    if max_batch_size <= 0:
        return ()
    if configured is None:
        return default_buckets(max_batch_size) if on_gpu else ()
    if not configured:
        return ()
    sizes = sorted(set(configured))
    if sizes[0] < 1 or sizes[-1] > max_batch_size:
        raise ValueError(
            f"batch_buckets {list(configured)} must lie within 1..max_batch_size ({max_batch_size})"
        )
    return tuple(sorted({*sizes, max_batch_size}))


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `rows`; `rows` itself when there are no buckets (or, which
    the batcher never sends, more rows than the largest)."""
    index = bisect.bisect_left(buckets, rows)
    return buckets[index] if index < len(buckets) else rows


def pad_rows(array: Array, rows: int) -> Array:
    """`array` with zero rows appended along dim 0 up to `rows` (a new array), or itself."""
    missing = rows - array.shape[0]
    if missing <= 0:
        return array
    padding = np.zeros((missing, *array.shape[1:]), dtype=array.dtype)
    if array.dtype == object:
        padding[...] = ""
    return np.concatenate([array, padding])
