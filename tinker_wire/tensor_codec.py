"""TensorData on the wire: numpy arrays as raw little-endian bytes plus dtype and shape.

Shared by the SDK and the server, so both sides agree byte for byte.
"""

from __future__ import annotations

import math

import numpy as np

from tinker_rpc.v1 import tensor_pb2

_WIRE_TO_NUMPY: dict[int, np.dtype] = {
    tensor_pb2.D_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.D_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.D_TYPE_FLOAT32: np.dtype("<f4"),
}
_NUMPY_TO_WIRE: dict[np.dtype, int] = {dtype: wire for wire, dtype in _WIRE_TO_NUMPY.items()}

# Largest tensor one message may describe; a lying shape must not make us allocate more.
_MAX_ELEMENTS = 1 << 31


class TensorDecodeError(ValueError):
    """A TensorData whose dtype, shape and byte length do not agree."""


def encode_array(array: np.ndarray) -> tensor_pb2.TensorData:
    """Encodes int64, int32 or float32 arrays (other dtypes are rejected, never guessed)."""
    dtype = array.dtype.newbyteorder("<")
    wire_dtype = _NUMPY_TO_WIRE.get(dtype)
    if wire_dtype is None:
        raise TypeError(f"cannot send dtype {array.dtype}; use int64, int32 or float32")
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    return tensor_pb2.TensorData(dtype=wire_dtype, shape=contiguous.shape, data=contiguous.tobytes())


def decode_array(tensor: tensor_pb2.TensorData) -> np.ndarray:
    """A read-only view over the message's bytes (no copy); raises TensorDecodeError."""
    dtype = _WIRE_TO_NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorDecodeError(f"unsupported dtype {tensor.dtype}; expected INT64, INT32 or FLOAT32")
    shape = tuple(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise TensorDecodeError(f"shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    if count > _MAX_ELEMENTS:
        raise TensorDecodeError(f"shape {list(shape)} has more than {_MAX_ELEMENTS} elements")
    if count * dtype.itemsize != len(tensor.data):
        raise TensorDecodeError(
            f"shape {list(shape)} of {dtype.name} needs {count * dtype.itemsize} bytes, data has {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
