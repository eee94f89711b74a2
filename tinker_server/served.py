"""The base model as the front end knows it: set once the worker has loaded it. The gRPC
server is up (health NOT_SERVING) before that; requests arriving early wait for it."""

from __future__ import annotations

import asyncio

from tinker_server import ops


class ServedModel:
    def __init__(self) -> None:
        self._info: ops.ModelInfo | None = None
        self._ready = asyncio.Event()

    def set(self, info: ops.ModelInfo) -> None:
        self._info = info
        self._ready.set()

    @property
    def info(self) -> ops.ModelInfo:
        """Only after `wait()`: the request paths await readiness before they get here."""
        if self._info is None:
            raise RuntimeError("the base model is not loaded yet")
        return self._info

    async def wait(self) -> ops.ModelInfo:
        await self._ready.wait()
        return self.info
