"""Server lifecycle: start the worker, the scheduler and the gRPC server; stop them cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import grpc

from tinker_rpc.v1 import service_pb2_grpc
from tinker_server.api.requests import RequestParser
from tinker_server.api.servicer import TinkerServicer
from tinker_server.config import ServerConfig
from tinker_server.runs import RunRegistry
from tinker_server.scheduler import Scheduler
from tinker_server.worker.client import WorkerClient

log = logging.getLogger(__name__)


class TinkerServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._worker = WorkerClient(config.base_model)
        self._grpc: grpc.aio.Server | None = None
        self._clock: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        model = await self._worker.start()
        scheduler = Scheduler(self._worker.run_cycle, config.cycle)
        self._clock = asyncio.create_task(scheduler.run(), name="scheduler-clock")
        registry = RunRegistry()
        parser = RequestParser(model, registry, config.limits, config.data_dir)
        servicer = TinkerServicer(model, registry, parser, scheduler, config.limits)
        options = [
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
            ("grpc.max_send_message_length", config.limits.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(options=options)
        service_pb2_grpc.add_TinkerServiceServicer_to_server(servicer, self._grpc)
        self.port = self._grpc.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {config.host}:{config.port}")
        await self._grpc.start()
        log.info(
            "serving %s on %s:%d (cycle=%s, data dir %s)",
            model.name,
            config.host,
            self.port,
            config.cycle,
            config.data_dir,
        )

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.config.shutdown_grace_seconds)
        if self._clock is not None:
            self._clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._clock
        await self._worker.stop()
        log.info("server stopped")


async def serve(config: ServerConfig) -> None:
    """Runs until SIGINT or SIGTERM, then stops the server and its worker."""
    server = TinkerServer(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await server.start()
        # One machine-readable line, so scripts and tests can find an ephemeral port.
        print(f"tinker-server listening on {config.host}:{server.port}", flush=True)
        await stop_requested.wait()
        log.info("shutting down")
    finally:
        await server.stop()
