"""Batch buckets: which sizes run, and how a batch is padded up to one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inferd.core.errors import InvalidInput
from inferd.core.models.config import ModelConfig, load_model_config
from inferd.core.runtime.buckets import bucket_for, default_buckets, pad_rows, resolve_buckets


@pytest.mark.parametrize(
    ("max_batch_size", "expected"),
    [
        (0, ()),
        (1, (1,)),
        (2, (1, 2)),
        (32, (1, 2, 4, 8, 16, 32)),
        (48, (1, 2, 4, 8, 16, 32, 48)),
        (128, (1, 2, 4, 8, 16, 32, 64, 128)),
    ],
)
def test_default_buckets_are_powers_of_two_and_the_maximum(
    max_batch_size: int, expected: tuple[int, ...]
) -> None:
    assert default_buckets(max_batch_size) == expected


def test_buckets_default_on_for_gpu_and_off_for_cpu() -> None:
    assert resolve_buckets(None, 16, on_gpu=True) == (1, 2, 4, 8, 16)
    assert resolve_buckets(None, 16, on_gpu=False) == ()


def test_configured_buckets_apply_on_cpu_too_and_always_include_the_maximum() -> None:
    assert resolve_buckets((8, 4, 4), 16, on_gpu=False) == (4, 8, 16)
    assert resolve_buckets((16,), 16, on_gpu=True) == (16,)


def test_empty_bucket_list_turns_padding_off_even_on_gpu() -> None:
    assert resolve_buckets((), 16, on_gpu=True) == ()


def test_model_without_batch_dim_has_no_buckets() -> None:
    assert resolve_buckets((1, 2), 0, on_gpu=True) == ()
    assert resolve_buckets(None, 0, on_gpu=True) == ()


def test_bucket_beyond_max_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"within 1\.\.max_batch_size"):
        resolve_buckets((4, 32), 16, on_gpu=True)


@pytest.mark.parametrize(
    ("rows", "expected"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 9)]
)
def test_batch_runs_in_the_smallest_bucket_that_holds_it(rows: int, expected: int) -> None:
    assert bucket_for(rows, (1, 2, 4, 8)) == expected


def test_without_buckets_a_batch_runs_at_its_own_size() -> None:
    assert bucket_for(5, ()) == 5


def test_pad_rows_appends_zero_rows_and_keeps_the_real_ones() -> None:
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    padded = pad_rows(a, 4)
    assert padded.shape == (4, 2)
    np.testing.assert_array_equal(padded[:3], a)
    np.testing.assert_array_equal(padded[3], [0, 0])
    assert pad_rows(a, 3) is a


def test_pad_rows_pads_strings_with_empty_strings() -> None:
    a = np.array([["x"], ["y"]], dtype=object)
    padded = pad_rows(a, 4)
    assert padded.tolist() == [["x"], ["y"], [""], [""]]


def test_config_takes_buckets_cuda_graphs_and_session_per_instance(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "max_batch_size = 16\nbatch_buckets = [1, 4, 16]\ncuda_graphs = true\n"
        "session_per_instance = true\n"
    )
    config = load_model_config(path)
    assert config.batch_buckets == (1, 4, 16)
    assert config.cuda_graphs
    assert config.session_per_instance


def test_config_defaults_leave_buckets_to_the_device() -> None:
    config = ModelConfig()
    assert config.batch_buckets is None
    assert not config.cuda_graphs
    assert not config.session_per_instance


def test_config_refuses_bucket_above_max_batch_size(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("max_batch_size = 8\nbatch_buckets = [4, 16]\n")
    with pytest.raises(InvalidInput, match="batch_buckets: 16 exceeds max_batch_size 8"):
        load_model_config(path)
