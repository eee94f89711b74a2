"""Deferred writes of ephemeral snapshots: late, in order, never for a snapshot gone first."""

from __future__ import annotations

import threading
import time

from tinker_server.worker.snapshot_writes import SnapshotWrites


def test_finish_writes_before_the_delay_on_the_callers_thread():
    writes = SnapshotWrites(delay=60)
    done: list[str] = []
    pending = writes.submit(lambda: done.append(threading.current_thread().name))
    assert pending.finish() and pending.finish()  # written once, and known to be
    assert done == [threading.current_thread().name]


def test_writes_left_to_the_thread_run_once_each_in_order_after_the_delay():
    writes = SnapshotWrites(delay=0.1)
    done: list[tuple[int, str, float]] = []
    submitted = time.monotonic()
    for index in range(3):
        writes.submit(lambda index=index: done.append((index, threading.current_thread().name, time.monotonic())))
    deadline = time.monotonic() + 5
    while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [index for index, _, _ in done] == [0, 1, 2]
    assert {name for _, name, _ in done} == {"snapshot-writer"}
    assert min(when for _, _, when in done) - submitted >= 0.1


def test_a_snapshot_cancelled_before_its_turn_is_never_written():
    writes = SnapshotWrites(delay=0.1)
    done: list[int] = []
    pending = writes.submit(lambda: done.append(1))
    pending.cancel()
    time.sleep(0.3)
    assert done == []
    assert not pending.finish()


class HeldWrite:
    """A write that, once started, waits for `release` before it records `label` in `done`."""

    def __init__(self, done: list[object], label: object) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.done, self.label = done, label

    def __call__(self) -> None:
        self.started.set()
        self.release.wait()
        self.done.append(self.label)


def test_finish_writes_at_once_and_cancel_waits_for_a_running_write():
    writes = SnapshotWrites(delay=60)
    done: list[object] = []
    slow_write = HeldWrite(done, 1)
    pending = writes.submit(slow_write)
    finisher = threading.Thread(target=pending.finish)
    finisher.start()
    slow_write.started.wait(5)
    canceller = threading.Thread(target=pending.cancel)
    canceller.start()
    time.sleep(0.1)
    assert canceller.is_alive()  # files are never deleted under a writer
    slow_write.release.set()
    canceller.join(5)
    finisher.join(5)
    assert done == [1] and pending.finish()


def test_a_failed_write_reports_its_files_missing():
    writes = SnapshotWrites(delay=60)

    def failing_write() -> None:
        raise OSError("disk full")

    assert not writes.submit(failing_write).finish()


def test_finish_all_waits_for_the_running_write_then_writes_the_rest_at_once():
    writes = SnapshotWrites(delay=0.05)
    done: list[object] = []
    slow_write = HeldWrite(done, "running")
    writes.submit(slow_write)
    assert slow_write.started.wait(5)  # the thread is writing it
    writes.delay = 60
    writes.submit(lambda: done.append(("pending", threading.current_thread().name)))
    threading.Timer(0.2, slow_write.release.set).start()
    writes.finish_all()
    assert done == ["running", ("pending", threading.current_thread().name)]
