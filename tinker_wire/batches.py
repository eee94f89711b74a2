"""Session stream batches: the messages queued behind one, taken to go out with it in one
SessionRequests / SessionResponses message (each message costs gRPC work on both sides)."""

from __future__ import annotations

import asyncio
from typing import Protocol, TypeVar

BATCH_BYTES = 1 << 20
"""At most this many bytes of queued messages go out together (a larger message goes alone)."""
ENTRY_FRAMING_BYTES = 16
"""What a batch adds around each entry (field tag and length), counted generously."""


class Sized(Protocol):
    def ByteSize(self) -> int: ...  # noqa: N802 (protobuf's name)


M = TypeVar("M", bound=Sized)


def take_queued(first: M, queue: asyncio.Queue[M | None], budget: int, held_back: list[M | None]) -> list[M]:
    """`first` and the messages queued behind it, in order, that fit in `budget` bytes with it
    (`first` however large); the first one that does not fit, or a None, goes to `held_back` for
    the caller to take before the queue's next."""
    taken, size = [first], first.ByteSize() + ENTRY_FRAMING_BYTES
    while not queue.empty():
        queued = queue.get_nowait()
        entry = 0 if queued is None else queued.ByteSize() + ENTRY_FRAMING_BYTES  # (sized once: it walks the message)
        if queued is None or size + entry > budget:
            held_back.append(queued)
            break
        taken.append(queued)
        size += entry
    return taken
