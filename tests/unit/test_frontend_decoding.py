"""The frontends' shared decoding and validation (`inferd.api.inference`), without a server:
every check a wire tensor goes through before it becomes an array, and the deadline a request
gets."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from inferd.api.inference import (
    Limits,
    WireTensor,
    absolute_deadline,
    check_outputs,
    decode_inputs,
)
from inferd.core.errors import InvalidInput
from inferd.core.types import ModelSignature, TensorSpec

LIMITS = Limits(max_elements=1_000)

# Batches (max 8 rows); one fixed dim of 4.
DENSE = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (4,)),),
    outputs=(TensorSpec("y", "FP32", (2,)), TensorSpec("z", "INT64", (1,))),
    max_batch_size=8,
)
# Batches; both inputs name their variable dim "sequence".
TEXT = ModelSignature(
    inputs=(
        TensorSpec("ids", "INT64", (-1,), ("sequence",)),
        TensorSpec("mask", "INT64", (-1,), ("sequence",)),
    ),
    outputs=(TensorSpec("out", "FP32", (3,)),),
    max_batch_size=4,
)
# No batch dim; a variable number of strings.
STRINGS = ModelSignature(
    inputs=(TensorSpec("s", "BYTES", (-1,)),),
    outputs=(TensorSpec("s_out", "BYTES", (-1,)),),
    max_batch_size=0,
)


def fp32(name: str, shape: list[int]) -> WireTensor:
    count = int(np.prod(shape)) if shape else 1
    return WireTensor(name, "FP32", shape, np.arange(count, dtype="<f4").tobytes())


def i64(name: str, shape: list[int]) -> WireTensor:
    return WireTensor(name, "INT64", shape, bytes(8 * int(np.prod(shape))))


def strings(*elements: bytes, shape: list[int] | None = None) -> WireTensor:
    contents = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    return WireTensor("s", "BYTES", [len(elements)] if shape is None else shape, contents)


def refused(signature: ModelSignature, *tensors: WireTensor, limits: Limits = LIMITS) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_inputs("m", signature, tensors, limits)
    return info.value.message


# --- decode_inputs: what passes ---------------------------------------------------------------


def test_fixed_size_input_becomes_a_zero_copy_view_of_the_received_bytes() -> None:
    tensor = fp32("x", [2, 4])
    x = decode_inputs("m", DENSE, [tensor], LIMITS)["x"]
    assert x.dtype == np.dtype("<f4") and x.shape == (2, 4)
    assert x.tolist() == np.arange(8, dtype=np.float32).reshape(2, 4).tolist()
    assert not x.flags.writeable  # np.frombuffer over the message's bytes, not a copy


def test_bytes_input_elements_reach_the_model_as_str_in_shape() -> None:
    inputs = decode_inputs("m", STRINGS, [strings(b"a", "\u00e9".encode(), b"")], LIMITS)
    s = inputs["s"]
    assert s.dtype == object and s.shape == (3,)
    assert s.tolist() == ["a", "\u00e9", ""]


def test_bytes_input_of_rank_two_is_decoded_in_row_major_order() -> None:
    signature = ModelSignature(
        inputs=(TensorSpec("s", "BYTES", (-1, -1)),), outputs=(), max_batch_size=0
    )
    s = decode_inputs("m", signature, [strings(b"a", b"b", b"c", b"d", shape=[2, 2])], LIMITS)
    assert s["s"].tolist() == [["a", "b"], ["c", "d"]]


def test_inputs_sharing_a_symbolic_dim_pass_when_they_agree() -> None:
    inputs = decode_inputs("m", TEXT, [i64("ids", [2, 5]), i64("mask", [2, 5])], LIMITS)
    assert {name: a.shape for name, a in inputs.items()} == {"ids": (2, 5), "mask": (2, 5)}


# --- decode_inputs: what is refused, and the message that names it ----------------------------


def test_unknown_input_names_the_model_and_its_inputs() -> None:
    message = refused(DENSE, fp32("xx", [1, 4]))
    assert message == "input 'xx' is not an input of model 'm'; expected ['x']"


def test_input_sent_twice_is_refused() -> None:
    assert refused(DENSE, fp32("x", [1, 4]), fp32("x", [1, 4])) == (
        "input 'x' appears more than once"
    )


def test_missing_input_is_named() -> None:
    assert refused(TEXT, i64("ids", [1, 3])) == "missing input(s) ['mask'] for model 'm'"


def test_datatype_must_match_the_models() -> None:
    tensor = WireTensor("x", "FP64", [1, 4], bytes(32))
    assert refused(DENSE, tensor) == "input 'x': datatype FP64 does not match the model's FP32"
    empty = WireTensor("x", "", [1, 4], bytes(16))
    assert "datatype (empty) does not match" in refused(DENSE, empty)


def test_negative_dim_is_refused_before_anything_else_of_the_shape() -> None:
    assert refused(DENSE, fp32("x", [-1, 4])) == (
        "input 'x': shape [-1, 4] has a negative dimension"
    )


def test_rank_must_match_the_models() -> None:
    assert refused(DENSE, fp32("x", [4])) == (
        "input 'x': shape [4] has rank 1; the model expects rank 2 [-1, 4]"
    )


def test_fixed_dim_must_match_the_models() -> None:
    assert refused(DENSE, fp32("x", [1, 3])) == (
        "input 'x': dim 1 is 3; the model expects 4 (shape [-1, 4])"
    )


def test_batch_dim_of_zero_is_refused() -> None:
    assert refused(DENSE, WireTensor("x", "FP32", [0, 4], b"")) == (
        "input 'x': batch dimension must be at least 1, got 0"
    )


def test_batch_dim_over_max_batch_size_is_refused() -> None:
    assert refused(DENSE, fp32("x", [9, 4])) == (
        "input 'x': batch dimension 9 exceeds max_batch_size 8"
    )
    assert decode_inputs("m", DENSE, [fp32("x", [8, 4])], LIMITS)["x"].shape == (8, 4)


def test_inputs_must_agree_on_the_batch_dim() -> None:
    assert refused(TEXT, i64("ids", [2, 3]), i64("mask", [3, 3])) == (
        "input 'mask': batch dimension 3 differs from input 'ids' (2)"
    )


def test_inputs_naming_the_same_symbolic_dim_must_agree_on_its_size() -> None:
    assert refused(TEXT, i64("ids", [1, 5]), i64("mask", [1, 6])) == (
        "input 'mask': dim 1 is 6 but input 'ids' dim 1 is 5; the model names both "
        "'sequence', so they must agree"
    )


def test_element_limit_counts_every_input_of_the_request() -> None:
    limits = Limits(max_elements=10)
    assert decode_inputs("m", TEXT, [i64("ids", [1, 5]), i64("mask", [1, 5])], limits)
    assert refused(TEXT, i64("ids", [1, 6]), i64("mask", [1, 6]), limits=limits) == (
        "input 'mask': 12 elements in the request exceed the limit of 10"
    )


def test_huge_declared_shape_is_refused_without_allocating_it() -> None:
    # 2**62 INT64 elements could never be allocated: the limit answers first.
    tensors = (
        WireTensor("ids", "INT64", [1, 2**62], b""),
        WireTensor("mask", "INT64", [1, 1], b""),
    )
    assert "exceed the limit" in refused(TEXT, *tensors)


@pytest.mark.parametrize(("size", "held"), [(31, "31 bytes"), (33, "33 bytes"), (0, "0 bytes")])
def test_contents_must_hold_exactly_the_shapes_bytes(size: int, held: str) -> None:
    assert refused(DENSE, WireTensor("x", "FP32", [2, 4], bytes(size))) == (
        f"input 'x': contents hold {held}; shape [2, 4] of FP32 needs 32"
    )


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            WireTensor("s", "BYTES", [2], struct.pack("<I", 3) + b"abc" + b"\1\0"),
            "input 's': BYTES element 1: length prefix runs past the end of the contents",
        ),
        (
            WireTensor("s", "BYTES", [1], struct.pack("<I", 16) + b"ab"),
            "input 's': BYTES element 0: declares 16 bytes, only 2 remain",
        ),
        (
            WireTensor("s", "BYTES", [3], struct.pack("<I", 1) + b"a"),
            "input 's': 5 bytes cannot hold 3 BYTES elements (each needs a 4-byte length)",
        ),
        (
            WireTensor("s", "BYTES", [1], struct.pack("<I", 1) + b"az"),
            "input 's': 1 bytes left over after 1 BYTES elements",
        ),
    ],
)
def test_malformed_bytes_contents_are_refused_with_the_codecs_reason(
    tensor: WireTensor, message: str
) -> None:
    assert refused(STRINGS, tensor) == message


def test_bytes_element_that_is_not_utf8_is_named_by_index() -> None:
    message = refused(STRINGS, strings(b"ok", b"\xff\xfe"))
    assert message.startswith("input 's' (element 1): 'utf-8' codec can't decode byte 0xff")


# --- check_outputs ----------------------------------------------------------------------------


def test_requested_outputs_are_kept_in_the_order_asked() -> None:
    assert check_outputs("m", DENSE, ["z", "y"]) == ("z", "y")
    assert check_outputs("m", DENSE, []) == ()


def test_unknown_requested_output_names_the_models_outputs() -> None:
    with pytest.raises(InvalidInput) as info:
        check_outputs("m", DENSE, ["w"])
    assert info.value.message == (
        "requested output 'w' is not an output of model 'm'; expected ['y', 'z']"
    )


def test_output_requested_twice_is_refused() -> None:
    with pytest.raises(InvalidInput, match="requested output 'y' appears more than once"):
        check_outputs("m", DENSE, ["y", "y"])


# --- absolute_deadline ------------------------------------------------------------------------


async def test_no_deadline_without_grpc_deadline_timeout_or_model_default() -> None:
    assert absolute_deadline(None, 0, None) is None
    assert absolute_deadline(None, 0, 0.0) is None


async def test_grpc_deadline_alone_sets_the_deadline() -> None:
    now = asyncio.get_running_loop().time()
    deadline = absolute_deadline(2.0, 0, None)
    assert deadline is not None and now + 2.0 <= deadline <= now + 2.1


async def test_request_timeout_alone_sets_the_deadline() -> None:
    now = asyncio.get_running_loop().time()
    deadline = absolute_deadline(None, 500_000, None)
    assert deadline is not None and now + 0.5 <= deadline <= now + 0.6


@pytest.mark.parametrize(("time_remaining", "timeout_us"), [(1.0, 3_000_000), (3.0, 1_000_000)])
async def test_sooner_of_grpc_deadline_and_request_timeout_wins(
    time_remaining: float, timeout_us: int
) -> None:
    now = asyncio.get_running_loop().time()
    deadline = absolute_deadline(time_remaining, timeout_us, 0.1)
    assert deadline is not None and now + 1.0 <= deadline <= now + 1.1


async def test_model_default_applies_only_without_deadline_or_timeout() -> None:
    now = asyncio.get_running_loop().time()
    deadline = absolute_deadline(None, 0, 0.25)
    assert deadline is not None and now + 0.25 <= deadline <= now + 0.35
    # A longer request timeout still replaces the shorter default.
    longer = absolute_deadline(None, 5_000_000, 0.25)
    assert longer is not None and longer >= now + 5.0


def test_deadline_is_on_the_event_loops_clock() -> None:
    loop = asyncio.new_event_loop()
    try:

        async def both() -> tuple[float | None, float]:
            return absolute_deadline(None, 1_000_000, None), asyncio.get_running_loop().time()

        deadline, now = loop.run_until_complete(both())
    finally:
        loop.close()
    assert deadline is not None and now <= deadline <= now + 1.0 + 0.1
    with pytest.raises(RuntimeError):  # outside a running loop there is no clock to use
        absolute_deadline(None, 1_000_000, None)
