"""Futures: APIFuture for a request's result, and the futures of clients that client-creating
methods return (Tinker 0.38's BackcompatTrainingClientFuture and BackcompatSamplingClientFuture)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from functools import cache
from typing import Any, Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C")
_UNSET: Any = object()

sdk_loop_threads: set[int] = set()
"""Idents of the threads that run the SDK's event loops (see _connection)."""


class APIFuture(ABC, Generic[T]):
    """`fut.result(timeout)` in sync code; `await fut` in async code.

    >>> future = training_client.forward_backward(data, "cross_entropy")
    >>> future.result().metrics["loss:sum"]
    """

    @abstractmethod
    def result(self, timeout: float | None = None) -> T:
        """Blocks until the request completed; raises its error, or TimeoutError."""

    @abstractmethod
    async def result_async(self, timeout: float | None = None) -> T: ...

    @abstractmethod
    def future(self) -> concurrent.futures.Future[T]:
        """A standard Future of the result, for `concurrent.futures.wait` and the like."""

    async def coroutine(self) -> T:
        """This future as a coroutine, for `asyncio.create_task`."""
        return await self.result_async()

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()


class AwaitableConcurrentFuture(APIFuture[T]):
    """An APIFuture over a concurrent Future; `convert` (applied once, in the caller's
    thread) turns the raw value into the result."""

    def __init__(self, future: concurrent.futures.Future[Any], *, convert: Callable[[Any], T] | None = None) -> None:
        self._raw = future
        self._convert = convert
        self._value: T = _UNSET
        self._lock = threading.Lock()

    def _converted(self, raw: Any) -> T:
        if self._convert is None:
            return raw
        with self._lock:
            if self._value is _UNSET:
                self._value = self._convert(raw)
            return self._value

    def result(self, timeout: float | None = None) -> T:
        if not self._raw.done() and threading.get_ident() in sdk_loop_threads:
            raise RuntimeError("result() called on the SDK's own event loop would wait on itself forever; await it")
        try:
            raw = self._raw.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"no result within {timeout}s") from None
        return self._converted(raw)

    async def result_async(self, timeout: float | None = None) -> T:
        waiter = asyncio.shield(asyncio.wrap_future(self._raw))
        try:
            raw = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(f"no result within {timeout}s") from None
        return self._converted(raw)

    def done(self) -> bool:
        return self._raw.done()

    def future(self) -> concurrent.futures.Future[T]:
        converted: concurrent.futures.Future[T] = concurrent.futures.Future()

        def relay(raw: concurrent.futures.Future[Any]) -> None:
            try:
                converted.set_result(self._converted(raw.result()))
            except BaseException as error:  # relayed to the caller, not swallowed
                converted.set_exception(error)

        self._raw.add_done_callback(relay)
        return converted


def completed(value: T) -> AwaitableConcurrentFuture[T]:
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    future.set_result(value)
    return AwaitableConcurrentFuture(future)


class BackcompatClientFuture(AwaitableConcurrentFuture[C]):
    """The future of a client being created. Call `.result()` or `await` it for the client.

    As in Tinker 0.38 it can also be used directly as the client, for now: each such use
    waits for the client and warns (FutureWarning) that this will stop working. Subclasses
    also derive from the client class (for isinstance) and name it in `_client_class`.
    """

    _client_class: type

    def __getattribute__(self, name: str) -> Any:
        if name in _forwarded_names(type(self)):
            _warn_used_as_client(name)
            return getattr(object.__getattribute__(self, "result")(), name)
        return object.__getattribute__(self, name)

    def __getattr__(self, name: str) -> Any:
        # Instance attributes of the client (e.g. `model_id`), which no class defines.
        if name.startswith("_"):
            raise AttributeError(name)
        _warn_used_as_client(name)
        return getattr(self.result(), name)

    def __repr__(self) -> str:
        raw = self._raw
        if not raw.done():
            state = "pending"
        elif raw.exception() is not None:
            state = f"failed: {raw.exception()!r}"
        else:
            state = repr(raw.result())
        return f"<{type(self).__name__}: {state}>"


@cache
def _forwarded_names(future_type: type[BackcompatClientFuture]) -> frozenset[str]:
    """The client's public names that the future itself does not define."""
    client_type = type.__getattribute__(future_type, "_client_class")
    own = set(dir(BackcompatClientFuture))
    return frozenset(name for name in dir(client_type) if not name.startswith("_") and name not in own)


def _warn_used_as_client(name: str) -> None:
    warnings.warn(
        f"using the future returned by a client-creating method as the client (`.{name}`) is deprecated; "
        "call .result() on it, or await it, to get the client first",
        FutureWarning,
        stacklevel=3,
    )
