"""TensorData: a tensor as the SDK holds it, numpy inside; torch is optional."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

TensorDtype: TypeAlias = Literal["int64", "float32"]
"""The dtypes, as Tinker's: any integer array is held as int64 (integer tensors travel as int32
when their values fit, half the bytes, and come back int64)."""

_NUMPY_DTYPES: dict[str, np.dtype] = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}


def dtype_name(dtype: np.dtype) -> str:
    """The TensorData dtype an array of `dtype` is held as."""
    for name, candidate in _NUMPY_DTYPES.items():
        if candidate == dtype:
            return name
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return "int64"
    if np.issubdtype(dtype, np.floating):
        return "float32"
    raise TypeError(f"unsupported dtype {dtype}; use an integer or floating type")


@dataclass(frozen=True, eq=False, init=False)
class TensorData:
    """A dense or sparse (CSR) tensor. Build it with `from_numpy`, `from_torch`,
    `from_torch_sparse`, or from a list and a dtype.

    >>> TensorData.from_numpy(np.array([1.0, 0.5], dtype=np.float32)).shape
    [2]
    """

    dtype: TensorDtype
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    """CSR row pointers (nrows + 1). When set, `array` holds only the listed values and
    every other entry is the `pad_value` given when densifying."""
    sparse_col_indices: list[int] | None = None
    """CSR column indices, one per listed value."""
    array: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]
    """The elements (the listed values, for a sparse tensor)."""

    def __init__(
        self,
        data: Sequence[int] | Sequence[float] | np.ndarray | None = None,
        dtype: TensorDtype | None = None,
        shape: Sequence[int] | None = None,
        sparse_crow_indices: Sequence[int] | None = None,
        sparse_col_indices: Sequence[int] | None = None,
    ) -> None:
        if dtype is None:
            if not isinstance(data, np.ndarray):
                raise TypeError("TensorData needs a dtype ('int64' or 'float32') unless data is a numpy array")
            dtype = dtype_name(data.dtype)
        if dtype not in _NUMPY_DTYPES:
            raise TypeError(f"TensorData dtype must be one of {sorted(_NUMPY_DTYPES)}, got {dtype!r}")
        # A copy, as Tinker's list is: a caller refilling one buffer for datum after datum, or a
        # view over a response's bytes, must not show through.
        array = np.array([] if data is None else data, dtype=_NUMPY_DTYPES[dtype])
        if (sparse_crow_indices is None) != (sparse_col_indices is None):
            raise ValueError("TensorData: give sparse_crow_indices and sparse_col_indices together")
        if sparse_crow_indices is None and shape is not None:
            array = array.reshape(tuple(shape))
        if sparse_crow_indices is not None and (shape is None or len(shape) != 2):
            raise ValueError("a sparse TensorData needs its dense 2-D shape")
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", list(array.shape) if sparse_crow_indices is None else list(shape))
        object.__setattr__(self, "sparse_crow_indices", _int_list(sparse_crow_indices))
        object.__setattr__(self, "sparse_col_indices", _int_list(sparse_col_indices))
        object.__setattr__(self, "array", array)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        return cls(array, shape=list(array.shape))

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """A copy of the tensor's values; bfloat16/float16/float64 widen or narrow to float32."""
        import torch

        if tensor.dtype in (torch.bfloat16, torch.float16, torch.float64):
            tensor = tensor.float()
        return cls.from_numpy(tensor.detach().cpu().contiguous().numpy())

    @classmethod
    def from_torch_sparse(cls, tensor: torch.Tensor, pad_value: int = 0) -> TensorData:
        """CSR for a 2-D tensor that is mostly `pad_value`, when that is smaller; dense otherwise."""
        dense = cls.from_torch(tensor)
        if tensor.ndim != 2:
            return dense
        return dense.to_sparse(_check_pad_value(pad_value))

    def to_sparse(self, pad_value: int = 0) -> TensorData:
        """This 2-D tensor as CSR when fewer numbers describe it that way; else itself."""
        values = self.to_numpy(pad_value)
        listed = values != pad_value
        rows, _ = values.shape
        if rows + 1 + 2 * int(listed.sum()) >= values.size:
            return self
        crow = np.concatenate([[0], np.cumsum(listed.sum(axis=1))])
        return TensorData(values[listed], self.dtype, list(values.shape), crow.tolist(), np.nonzero(listed)[1].tolist())

    @property
    def data(self) -> list[int] | list[float]:
        """The elements, flattened, as a Python list (the listed values, for a sparse tensor)."""
        return self.array.reshape(-1).tolist()

    @property
    def is_sparse(self) -> bool:
        return self.sparse_crow_indices is not None

    def to_numpy(self, pad_value: int = 0) -> np.ndarray:
        """The dense array, the caller's own (changing it changes nothing here, as in Tinker)."""
        dense = self.dense(pad_value)
        return dense.copy() if dense is self.array else dense

    def dense(self, pad_value: int = 0) -> np.ndarray:
        """The dense array, read in place (not a copy): for the SDK's own reads. A sparse tensor is
        densified with `pad_value` in unlisted entries."""
        if self.sparse_crow_indices is None:
            return self.array
        dense = np.full(self.shape, _check_pad_value(pad_value), dtype=self.array.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.sparse_crow_indices))
        dense[rows, self.sparse_col_indices] = self.array
        return dense

    def to_torch(self, pad_value: int = 0) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.to_numpy(pad_value))

    def tolist(self, pad_value: int = 0) -> list[Any]:
        return self.dense(pad_value).tolist()

    def __repr__(self) -> str:
        sparse = f", sparse with {self.array.size} listed" if self.is_sparse else ""
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape}{sparse})"


def _int_list(values: Sequence[int] | None) -> list[int] | None:
    return None if values is None else [int(value) for value in values]


def _check_pad_value(pad_value: Any) -> int:
    if isinstance(pad_value, bool) or not isinstance(pad_value, int | np.integer):
        raise TypeError(f"pad_value must be an integer, got {type(pad_value).__name__}: {pad_value!r}")
    return int(pad_value)
