"""What Tinker's pydantic models coerce, for the dataclasses here: numpy numbers and whole floats
become ints, numbers become floats, and what cannot is refused, not sent as something else (a
temperature of None went out as 0: greedy; a token id of 1.5 was truncated)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np


def whole(value: object, field: str) -> int:
    """`value` as an int: an int, a numpy integer or a float with no fraction."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{field}: {value!r} is not a whole number") from None


def real(value: object, field: str) -> float:
    """`value` as a float: any real number (None and text are refused)."""
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{field}: {value!r} is not a number")
    return float(value)  # type: ignore[arg-type]


def token_array(tokens: Sequence[object] | np.ndarray, field: str) -> np.ndarray:
    """`tokens` as int64: ints, numpy integers or whole floats, checked where they are converted
    anyway (to send, or to read back); `np.asarray(tokens, np.int64)` would truncate 1.5 silently."""
    array = np.asarray(tokens)
    if array.dtype.kind == "f" and np.array_equal(array, np.trunc(array)):
        return array.astype(np.int64)
    if array.size and (array.ndim != 1 or array.dtype.kind not in "iub"):
        raise TypeError(f"{field}: token ids must be whole numbers in one list, got {list(tokens)[:8]!r}")
    return array.astype(np.int64, copy=False)
