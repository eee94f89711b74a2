"""Writes of ephemeral snapshots' files: on one background thread, each a while after its save.

In an RL loop a run saves an unnamed snapshot every step and the next one replaces it within
seconds; writing each one would spend a core and the disk on files deleted at once. So a write
waits a few seconds, and a snapshot deleted before then is never written. One that must leave
memory sooner is written on the spot (`finish`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from enum import Enum, auto

log = logging.getLogger(__name__)

WRITE_DELAY_SECONDS = 5.0
"""Longer than an RL step on a small model, short enough that a snapshot a client keeps using
(an evaluation's, the last of a run) is soon on disk, where it outlives a restart."""


class _State(Enum):
    PENDING = auto()
    RUNNING = auto()
    WRITTEN = auto()
    FAILED = auto()
    CANCELLED = auto()


class PendingWrite:
    """One snapshot's files, to be written."""

    def __init__(self, write: Callable[[], None], due: float, lock: threading.Condition) -> None:
        self._write: Callable[[], None] | None = write  # holds the snapshot's tensors until it runs
        self.due = due
        self._lock = lock
        self._state = _State.PENDING

    def cancel(self) -> None:
        """The files are not wanted: a write not started never starts; one running finishes first
        (so the caller can delete what it wrote)."""
        with self._lock:
            if self._state is _State.PENDING:
                self._state = _State.CANCELLED
                self._write = None  # the tensors go now, not when the queue reaches this write
            self._lock.wait_for(lambda: self._state is not _State.RUNNING)

    def finish(self) -> bool:
        """Writes the files now unless they are written already; True once they are on disk."""
        if self.claim():
            self.run()
        with self._lock:
            self._lock.wait_for(lambda: self._state is not _State.RUNNING)
            return self._state is _State.WRITTEN

    def claim(self) -> bool:
        """Takes the write for the calling thread: True if it was pending."""
        with self._lock:
            if self._state is not _State.PENDING:
                return False
            self._state = _State.RUNNING
            return True

    def run(self) -> None:
        """Runs a claimed write."""
        write, self._write = self._write, None
        try:
            write()
            outcome = _State.WRITTEN
        except Exception:  # the snapshot stays usable in memory; only its files are missing
            log.exception("writing a snapshot's files failed")
            outcome = _State.FAILED
        with self._lock:
            self._state = outcome
            self._lock.notify_all()


class SnapshotWrites:
    """A queue of delayed writes and the thread that runs them, in order."""

    def __init__(self, delay: float = WRITE_DELAY_SECONDS) -> None:
        self.delay = delay
        self._lock = threading.Condition()
        self._queue: deque[PendingWrite] = deque()
        self._taken: PendingWrite | None = None
        """The write the thread took last (it may be running)."""
        self._thread = threading.Thread(target=self._loop, name="snapshot-writer", daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None]) -> PendingWrite:
        pending = PendingWrite(write, time.monotonic() + self.delay, self._lock)
        with self._lock:
            self._queue.append(pending)
            self._lock.notify_all()
        return pending

    def finish_all(self) -> None:
        """Writes every pending snapshot now, on the calling thread, after the one the thread may
        be writing (the worker is stopping: samplers may hold these snapshots after a restart)."""
        with self._lock:
            writes = [self._taken] if self._taken is not None else []
            writes += self._queue
            self._queue.clear()
        for write in writes:
            write.finish()

    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._queue))
                wait = self._queue[0].due - time.monotonic()
                if wait > 0:
                    self._lock.wait(timeout=wait)
                    continue  # due now, or woken by another submit: look again
                pending = self._taken = self._queue.popleft()
            if pending.claim():
                pending.run()
