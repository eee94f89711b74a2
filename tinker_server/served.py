"""The base models as the front end knows them: set once their replicas have loaded them. The
gRPC server is up (health NOT_SERVING) before that; requests arriving early wait for it."""

from __future__ import annotations

import asyncio

from tinker_server import ops


class ServedModels:
    def __init__(self) -> None:
        self._models: dict[str, ops.ModelInfo] = {}
        self._ready = asyncio.Event()

    def set(self, models: dict[str, ops.ModelInfo]) -> None:
        self._models = dict(models)
        self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()

    @property
    def names(self) -> list[str]:
        return list(self._models)

    @property
    def default(self) -> ops.ModelInfo:
        """The first served model (the one uploads adapt). Only after `wait()`."""
        if not self._models:
            raise RuntimeError("the base models are not loaded yet")
        return next(iter(self._models.values()))

    def get(self, name: str) -> ops.ModelInfo | None:
        return self._models.get(name)

    def all(self) -> list[ops.ModelInfo]:
        return list(self._models.values())
