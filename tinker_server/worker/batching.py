"""Padding-aware batching: group rows of similar length so padding stays a small fraction, and
cap each pass's padded size so its activations fit in memory."""

from __future__ import annotations

from collections.abc import Sequence

PADDING_TOLERANCE = 0.25
"""A bucket may hold at most 25% more tokens, padded, than its rows really have."""


def length_buckets(
    lengths: Sequence[int], max_tokens: int, tolerance: float = PADDING_TOLERANCE, min_tokens: int = 0
) -> list[list[int]]:
    """Row indices split into buckets, longest rows first; each bucket's padded size
    (rows x its longest row) stays within (1 + tolerance) x its real tokens, or within
    `min_tokens` (what padding below that wastes costs less than one more pass), and within
    max_tokens (a single row longer than that makes a bucket of its own)."""
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    buckets: list[list[int]] = []
    real = 0
    for row in order:
        if buckets:
            bucket = buckets[-1]
            padded = lengths[bucket[0]] * (len(bucket) + 1)
            if padded <= max_tokens and (padded <= min_tokens or padded <= (1 + tolerance) * (real + lengths[row])):
                bucket.append(row)
                real += lengths[row]
                continue
        buckets.append([row])
        real = lengths[row]
    return buckets
