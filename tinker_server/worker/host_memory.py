"""How the worker's process takes memory from the operating system.

glibc maps each block above a threshold (128 KiB at first, raised as blocks are freed, never past
32 MiB) on its own and unmaps it when freed: a tensor freed and allocated again, step after step,
page-faults all of its memory in again each time. Choosing the next token among 152k for 32 rows
took 40 ms so (24k faults), 12 ms without; an in-process training step of 8 x 512 tokens on the
embedded model 350 ms (88k faults), 245 ms without (the service's worker faulted 13k a step). The worker
keeps what it frees for its next step instead, as PyTorch's caching allocator does on a GPU: its
resident memory stays at the peak of its steps rather than following the live tensors."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEPT_BLOCK_BYTES = 1 << 30
"""Blocks up to this size come from (and go back to) the heap; larger ones are mapped on their own."""


def keep_freed_memory() -> bool:
    """Makes glibc keep freed blocks (up to KEPT_BLOCK_BYTES, and as much free heap) for reuse;
    False where the C library is not glibc (nothing changes there)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        log.debug("no mallopt in this C library: freed host memory goes back to the system")
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEPT_BLOCK_BYTES))
