"""TensorData on the wire: raw little-endian bytes, exact round trips, lies rejected."""

from __future__ import annotations

import numpy as np
import pytest

from tinker_rpc.v1 import tensor_pb2
from tinker_wire.tensor_codec import TensorDecodeError, decode_array, encode_array


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32])
def test_round_trip_is_exact_and_decoding_does_not_copy(dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 7 - 5).astype(dtype)
    message = encode_array(array)
    assert len(message.data) == array.nbytes  # raw bytes, nothing else
    decoded = decode_array(message)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.owndata  # a view over the message's bytes


def test_big_endian_input_is_sent_little_endian():
    array = np.array([1, 2, 3], dtype=">i8")
    assert encode_array(array).data == np.array([1, 2, 3], dtype="<i8").tobytes()


def test_unsupported_dtypes_are_refused_not_guessed():
    with pytest.raises(TypeError, match="float64"):
        encode_array(np.zeros(3, dtype=np.float64))


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (tensor_pb2.TensorData(dtype=tensor_pb2.D_TYPE_UNSPECIFIED, shape=[1], data=b"\0" * 8), "unsupported dtype"),
        (tensor_pb2.TensorData(dtype=tensor_pb2.D_TYPE_INT32, shape=[3], data=b"\0" * 8), "needs 12 bytes"),
        (tensor_pb2.TensorData(dtype=tensor_pb2.D_TYPE_INT32, shape=[-1, 2], data=b""), "negative"),
        (tensor_pb2.TensorData(dtype=tensor_pb2.D_TYPE_FLOAT32, shape=[1 << 20, 1 << 20], data=b""), "more than"),
        (tensor_pb2.TensorData(dtype=42, shape=[1], data=b"\0" * 4), "unsupported dtype"),
    ],
)
def test_inconsistent_messages_are_rejected(message, error):
    with pytest.raises(TensorDecodeError, match=error):
        decode_array(message)
