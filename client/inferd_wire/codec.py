"""The wire format of a tensor, shared by the client and the server.

A tensor travels as raw little-endian row-major bytes. BYTES elements travel as a 4-byte
little-endian length followed by that many bytes. The datatype names are the Open Inference
Protocol's, so the native API and the OIP frontend describe tensors the same way.

`to_wire` is the one encoder (client requests, server responses) and `from_wire` the one
decoder (server requests, client responses); the server adds only its own checks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

# Datatype name -> numpy dtype (little-endian). BYTES maps to object arrays of `bytes`.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

_LENGTH = struct.Struct("<I")


# numpy dtype -> datatype name, for the dtypes arrays usually carry (native byte order
# included): one dict lookup per tensor on the hot path instead of a scan of DTYPES.
_NAMES: dict[np.dtype, str] = {
    dtype: name
    for name, little_endian in DTYPES.items()
    if name != "BYTES"
    for dtype in (little_endian, little_endian.newbyteorder("="))
}


def datatype_of(array: np.ndarray) -> str:
    """The wire datatype name for a numpy array (str and bytes arrays are BYTES)."""
    name = _NAMES.get(array.dtype)
    if name is not None:
        return name
    kind = array.dtype.kind
    if kind in ("O", "S", "U"):
        return "BYTES"
    if array.dtype == ml_dtypes.bfloat16:
        return "BF16"
    for name, dtype in DTYPES.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise TypeError(f"dtype {array.dtype} has no wire datatype")


def pack_bytes_elements(elements: Iterable[object]) -> bytes:
    """Serialise BYTES elements (bytes, or str as UTF-8) with their 4-byte length prefixes."""
    parts: list[bytes] = []
    for element in elements:
        if isinstance(element, str):
            data = element.encode()
        elif isinstance(element, (bytes, bytearray, memoryview)):
            data = bytes(element)
        else:
            data = str(element).encode()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack_bytes_elements(raw: bytes, count: int) -> np.ndarray:
    """Parse exactly `count` length-prefixed elements from `raw` into a 1-D object array.

    Raises ValueError naming the problem when the bytes do not hold exactly `count` elements.
    The element count is checked against what the bytes can hold before anything is allocated.
    """
    if count > len(raw) // _LENGTH.size:
        raise ValueError(
            f"{len(raw)} bytes cannot hold {count} BYTES elements (each needs a 4-byte length)"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise ValueError(f"BYTES element {i}: length prefix runs past the end of the contents")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(raw):
            raise ValueError(
                f"BYTES element {i}: declares {length} bytes, only {len(raw) - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise ValueError(f"{len(raw) - offset} bytes left over after {count} BYTES elements")
    return out


def element_count(shape: Iterable[int]) -> int:
    """Elements in a tensor of `shape` (1 for a scalar); Python ints, so never overflows."""
    count = 1
    for d in shape:
        count *= int(d)
    return count


def wire_contents(datatype: str, elements: np.ndarray | Iterable[object]) -> bytes:
    """The wire contents of `elements` (an array, or a flat sequence of values) as `datatype`:
    row-major little-endian bytes, or length-prefixed BYTES elements.

    Raises OverflowError or ValueError (from numpy) when a value does not fit the datatype.
    """
    if datatype == "BYTES":
        flat = elements.reshape(-1) if isinstance(elements, np.ndarray) else elements
        return pack_bytes_elements(flat)
    return np.ascontiguousarray(elements, dtype=DTYPES[datatype]).tobytes()


def to_wire(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, contents) for a numpy array: how the client sends inputs and the
    server sends outputs."""
    datatype = datatype_of(array)
    return datatype, list(array.shape), wire_contents(datatype, array)


def from_wire(datatype: str, shape: Iterable[int], contents: bytes) -> np.ndarray:
    """A numpy array from (datatype, shape, contents): how the server reads inputs and the
    client reads outputs. Fixed-size types are zero-copy read-only views; BYTES elements are
    `bytes` objects. The byte length is checked before anything is allocated.

    Raises ValueError when the datatype is unknown or the contents do not match the shape.
    """
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"shape {dims} has a negative dimension")
    count = element_count(dims)
    if datatype == "BYTES":
        return unpack_bytes_elements(contents, count).reshape(dims)
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {', '.join(DTYPES)}")
    expected = count * dtype.itemsize
    if len(contents) != expected:
        raise ValueError(
            f"contents hold {len(contents)} bytes; shape {dims} of {datatype} needs {expected}"
        )
    return np.frombuffer(contents, dtype=dtype).reshape(dims)
