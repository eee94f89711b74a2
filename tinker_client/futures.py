"""APIFuture: the result of a queued request, for sync and async code alike."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_UNSET: Any = object()


class APIFuture(Generic[T]):
    """`fut.result(timeout)` in sync code; `await fut` or `await fut.result_async(timeout)` in async code.

    >>> future = training_client.forward_backward(data, "cross_entropy")
    >>> future.result().metrics["loss:sum"]
    """

    def __init__(self, raw: concurrent.futures.Future[Any], convert: Callable[[Any], T]) -> None:
        self._raw = raw
        self._convert = convert
        self._value: T = _UNSET

    def _converted(self, raw: Any) -> T:
        if self._value is _UNSET:
            self._value = self._convert(raw)
        return self._value

    def result(self, timeout: float | None = None) -> T:
        """Blocks until the request completed; raises its error, or TimeoutError."""
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

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    async def coroutine(self) -> T:
        """This future as a coroutine, for `asyncio.create_task`."""
        return await self

    def done(self) -> bool:
        return self._raw.done()

    def future(self) -> concurrent.futures.Future[T]:
        """A standard Future of the converted result, for `concurrent.futures.wait` and the like."""
        converted: concurrent.futures.Future[T] = concurrent.futures.Future()

        def relay(raw: concurrent.futures.Future[Any]) -> None:
            try:
                converted.set_result(self._converted(raw.result()))
            except BaseException as error:  # relayed to the caller, not swallowed
                converted.set_exception(error)

        self._raw.add_done_callback(relay)
        return converted
