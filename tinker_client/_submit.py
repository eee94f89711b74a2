"""Submitting requests on a connection's stream and combining their results into futures.

A Sequencer keeps one training client's requests in call order even when one of them
(forward_backward_custom's backward) can only be built after an earlier result came back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from tinker_client._connection import Connection, Pending
from tinker_client.futures import AwaitableConcurrentFuture
from tinker_rpc.v1 import service_pb2

T = TypeVar("T")


class Submitter(Protocol):
    def submit(self, requests: Sequence[service_pb2.SessionRequest]) -> list[Pending]: ...


@dataclass
class Gate:
    """A place in a client's order for requests not known yet."""

    requests: list[Pending] | None = None
    error: BaseException | None = None
    closed: bool = False


@dataclass(eq=False)
class Sequencer:
    """Sends one client's requests in call order; a gate holds the later ones back until it
    is filled with the requests it stands for, or fails them if it fails."""

    connection: Connection
    _held: deque[Pending | Gate] = field(default_factory=deque)  # loop thread only

    def __post_init__(self) -> None:
        self.connection.holders.add(self)

    @property
    def holding(self) -> bool:
        """Loop thread: whether requests wait here, not sent yet (behind a custom loss's forward)."""
        return bool(self._held)

    def submit(self, requests: Sequence[service_pb2.SessionRequest]) -> list[Pending]:
        pendings = [self.connection.prepare(request) for request in requests]
        self.connection.loop.call_soon_threadsafe(self._admit, pendings)
        return pendings

    def gate(self) -> Gate:
        """A placeholder at this point of the order (thread-safe)."""
        gate = Gate()
        self.connection.loop.call_soon_threadsafe(self._admit, [gate])
        return gate

    def fill(self, gate: Gate, requests: Sequence[service_pb2.SessionRequest]) -> list[Pending]:
        """Loop thread: the gate's requests go out in its place, then what waited behind it."""
        gate.requests = [self.connection.prepare(request) for request in requests]
        gate.closed = True
        self._flush()
        return gate.requests

    def fail(self, gate: Gate, error: BaseException) -> None:
        """Loop thread: the gate failed; requests that waited behind it fail with `error`."""
        gate.error, gate.closed = error, True
        self._flush()

    def _admit(self, items: list[Pending | Gate]) -> None:
        self._held.extend(items)
        self._flush()

    def _flush(self) -> None:
        while self._held:
            head = self._held[0]
            if isinstance(head, Gate) and not head.closed:
                return
            self._held.popleft()
            if isinstance(head, Pending):
                self.connection.enqueue([head])
            elif head.error is not None:
                waiting, self._held = self._held, deque()
                for item in waiting:
                    for pending in [item] if isinstance(item, Pending) else item.requests or []:
                        pending.fail(head.error)
            else:
                self.connection.enqueue(head.requests or [])


def all_results(pendings: Sequence[Pending]) -> concurrent.futures.Future[list[service_pb2.Result]]:
    """One future for several requests: their results in order, or the first error."""
    combined: concurrent.futures.Future[list[service_pb2.Result]] = concurrent.futures.Future()
    remaining = len(pendings)
    lock = threading.Lock()

    def on_done(finished: concurrent.futures.Future[service_pb2.Result]) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            if combined.done():
                return
            if finished.exception() is not None:
                combined.set_exception(finished.exception())
            elif remaining == 0:
                combined.set_result([pending.result.result() for pending in pendings])

    for pending in pendings:
        pending.result.add_done_callback(on_done)
    return combined


def submit_all(
    submitter: Submitter,
    requests: Sequence[service_pb2.SessionRequest],
    convert: Callable[[list[service_pb2.Result]], T],
) -> AwaitableConcurrentFuture[T]:
    """Queues requests back to back; one future of all their results, returned at once."""
    return AwaitableConcurrentFuture(all_results(submitter.submit(requests)), convert=convert)


async def submit_all_acked(
    submitter: Submitter,
    requests: Sequence[service_pb2.SessionRequest],
    convert: Callable[[list[service_pb2.Result]], T],
) -> AwaitableConcurrentFuture[T]:
    """As submit_all, but returns once the server acked every request (a rejected request
    raises here, at the first await)."""
    pendings = submitter.submit(requests)
    await asyncio.gather(*(asyncio.wrap_future(pending.ack) for pending in pendings))
    return AwaitableConcurrentFuture(all_results(pendings), convert=convert)


def submit(
    submitter: Submitter, request: service_pb2.SessionRequest, convert: Callable[[service_pb2.Result], T]
) -> AwaitableConcurrentFuture[T]:
    return submit_all(submitter, [request], lambda results: convert(results[0]))


async def submit_acked(
    submitter: Submitter, request: service_pb2.SessionRequest, convert: Callable[[service_pb2.Result], T]
) -> AwaitableConcurrentFuture[T]:
    return await submit_all_acked(submitter, [request], lambda results: convert(results[0]))
