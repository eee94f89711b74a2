"""The local platform's replica: a spawned worker process on this machine, driven over a pipe.

Pipe I/O runs in a thread so the gRPC event loop never blocks on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing

from tinker_server.logs import current_format
from tinker_server.ops import Cycle, CycleReport, ModelInfo, Outcome, ResidencyStats, WorkerOptions
from tinker_server.worker.main import WorkerStartupError, worker_main
from tinker_server.worker.platform import WorkerDied

log = logging.getLogger(__name__)


class WorkerClient:
    def __init__(self, base_model: str | None, options: WorkerOptions) -> None:
        self._base_model = base_model
        context = multiprocessing.get_context("spawn")  # never fork a process with gRPC threads
        self._conn, child_conn = context.Pipe()
        self.work_waiting = context.Event()
        self._process = context.Process(
            target=worker_main,
            args=(
                child_conn,
                base_model,
                options,
                logging.getLogger().getEffectiveLevel(),
                current_format(),
                self.work_waiting,
            ),
            name="tinker-worker",
            daemon=True,
        )
        self._child_conn = child_conn
        self._exchanging = asyncio.Lock()
        self.residency = ResidencyStats()
        """Where the worker's adapters are, as of its last cycle."""

    async def is_alive(self) -> bool:
        return self._process.is_alive()

    def where(self) -> str:
        return f"pid {self._process.pid}"

    async def start(self) -> ModelInfo:
        self._process.start()
        self._child_conn.close()
        reply = await asyncio.to_thread(self._receive)
        if isinstance(reply, WorkerStartupError):
            raise RuntimeError(f"worker could not load the base model: {reply.message}")
        log.info("worker pid %d serving %s", self._process.pid, reply.name)
        return reply

    async def run_cycle(self, cycle: Cycle) -> list[Outcome]:
        """One cycle at a time on the pipe (the scheduler's, and the sweeper's empty ones)."""
        async with self._exchanging:
            report: CycleReport = await asyncio.to_thread(self._exchange, cycle)
        self.residency = report.residency
        return report.outcomes

    def _exchange(self, cycle: Cycle) -> CycleReport:
        try:
            self._conn.send(cycle)
        except (BrokenPipeError, OSError) as error:
            raise WorkerDied(f"worker process exited ({error})") from error
        return self._receive()

    def _receive(self) -> object:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as error:
            raise WorkerDied(f"worker process exited (code {self._process.exitcode})") from error

    async def stop(self, timeout: float = 10.0) -> None:
        if not self._process.is_alive():
            return
        with contextlib.suppress(OSError):  # already gone: nothing to tell it
            self._conn.send(None)
        await asyncio.to_thread(self._process.join, timeout)
        if self._process.is_alive():
            log.warning("worker did not stop in %.0fs; killing it", timeout)
            self._process.kill()
            await asyncio.to_thread(self._process.join, 5)
        self._conn.close()
