"""The worker under supervision: when its process dies, a new one starts and every live
training run comes back from its last checkpoint (weights and optimizer state)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from tinker_server import metrics, ops
from tinker_server.runs import Runs
from tinker_server.worker.client import WorkerClient, WorkerDied

log = logging.getLogger(__name__)


class SupervisedWorker:
    def __init__(
        self,
        base_model: str | None,
        options: ops.WorkerOptions,
        runs: Runs,
        set_serving: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._base_model = base_model
        self._options = options
        self._runs = runs
        self._set_serving = set_serving
        self._worker = WorkerClient(base_model, options)
        self.restarts = 0

    async def start(self) -> ops.ModelInfo:
        return await self._worker.start()

    @property
    def residency(self) -> ops.ResidencyStats:
        return self._worker.residency

    async def stop(self) -> None:
        await self._worker.stop()

    async def run_cycle(self, cycle: ops.Cycle) -> list[ops.Outcome]:
        try:
            return await self._worker.run_cycle(cycle)
        except WorkerDied as error:
            log.error("the worker died during cycle %d (%s); restarting it", cycle.cycle_id, error)
            report = await self._restart()
            raise WorkerDied(f"{error}; a new worker {report}") from error

    async def _restart(self) -> str:
        await self._set_serving(False)  # health: NOT_SERVING until the runs are back
        await self._worker.stop()
        self._worker = WorkerClient(self._base_model, self._options)
        await self._worker.start()
        self.restarts += 1
        metrics.WORKER_RESTARTS.inc()
        restored, lost = [], []
        for run in self._runs.live_runs():
            checkpoint = self._runs.last_checkpoint(run.model_id, "training")
            outcome = None
            if checkpoint is not None:
                source = str(self._runs.directory(checkpoint.path))
                item = ops.WorkItem(uuid.uuid4().hex, run.model_id, ops.CreateAdapter(run.lora, source, True))
                (outcome,) = await self._worker.run_cycle(ops.Cycle(0, [item]))
            if outcome is not None and outcome.error is None:
                restored.append(f"{run.model_id} from {checkpoint.path}")
            else:
                self._runs.mark_lost(run.model_id)
                lost.append(run.model_id)
        log.warning("worker restarted: restored %s; lost (no checkpoint) %s", restored or "none", lost or "none")
        await self._set_serving(True)
        return f"restored {len(restored)} run(s) from their last checkpoints (steps after those are lost)" + (
            f"; runs without a checkpoint lost their training: {', '.join(lost)}" if lost else ""
        )
