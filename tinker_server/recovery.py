"""The worker under supervision: when its process dies (mid-cycle, or idle), a new one starts and
every live training run comes back from its own restore point: its seeded creation, or the
training checkpoint it last saved or loaded.

What the crash cost is said, never hidden: read-only requests of the dying cycle run again on the
new worker; a run whose state had moved on from its restore point is fenced, its requests failing
with where it went back to, until the client acknowledges with load_state.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from tinker_server import metrics, ops
from tinker_server.runs import Runs, rollback_message
from tinker_server.store import TrainingRun
from tinker_server.worker.platform import Replica, WorkerDied, WorkerPlatform

log = logging.getLogger(__name__)
WATCH_SECONDS = 0.5
"""How often an idle worker is checked: a dead one is replaced before the next request needs it."""

RECENT_CYCLES = 50
"""Cycles each replica remembers for the console's server page."""

Handover = Callable[[set[str]], Awaitable[bool]]
"""Offered a dead worker's runs (with those that were changing when it died): True if it placed
them elsewhere (this replica retires), False to restart the worker here."""


@dataclass(frozen=True)
class CycleSummary:
    """What one cycle carried: requests, the training runs they were for (the tenants sharing the
    base model's batch), rows (data trained on, samples asked for), and how long it took."""

    cycle_id: int
    ended_at: float
    seconds: float
    requests: int
    runs: int
    rows: int

    @classmethod
    def of(cls, cycle: ops.Cycle, seconds: float) -> CycleSummary:
        runs = len({ops.home_run(item) for item in cycle.items})
        rows = sum(_rows(item.operation) for item in cycle.items)
        return cls(cycle.cycle_id, time.time(), seconds, len(cycle.items), runs, rows)


def _rows(operation: ops.Operation) -> int:
    if isinstance(operation, ops.ForwardBackward):
        return len(operation.data)
    return operation.num_samples if isinstance(operation, ops.Sample) else 0


class SupervisedWorker:
    def __init__(
        self,
        platform: WorkerPlatform,
        base_model: str | None,
        options: ops.WorkerOptions,
        runs: Runs,
        runs_here: Callable[[], list[TrainingRun]],
        set_serving: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._platform = platform
        self._base_model = base_model
        self._options = options
        self._runs = runs
        self._runs_here = runs_here
        self._set_serving = set_serving
        self._worker: Replica = platform.replica(base_model, options)
        self._lock = asyncio.Lock()  # one cycle or one restart at a time
        self.restarts = 0
        self.handover: Handover | None = None
        self.retired = False
        """Its worker died and its runs went to other replicas: it runs nothing more."""
        self._unanswered: dict[str, ops.WorkItem] = {}
        """Sent to the worker, no outcome yet (samples generating over several cycles)."""
        self.recent_cycles: deque[CycleSummary] = deque(maxlen=RECENT_CYCLES)
        """The latest cycles that brought new requests, oldest first."""

    async def start(self) -> ops.ModelInfo:
        return await self._worker.start()

    @property
    def residency(self) -> ops.ResidencyStats:
        return self._worker.residency

    # The scheduler's WorkSignal, passed on to whichever worker runs now.
    def set(self) -> None:
        self._worker.work_waiting.set()

    def clear(self) -> None:
        self._worker.work_waiting.clear()

    def where(self) -> str:
        return self._worker.where()

    async def stop(self) -> None:
        await self._worker.stop()

    async def watch(self) -> None:
        """Replaces a worker that died between cycles, at once (until cancelled or retired)."""
        while not self.retired:
            await asyncio.sleep(WATCH_SECONDS)
            if self._lock.locked() or self._unanswered:
                continue  # cycles are running: their end says whether the worker lives
            async with self._lock:
                if not self.retired and not await self._worker.is_alive():
                    log.error("the worker (%s) died while idle", self._worker.where())
                    await self._replace(set())

    async def run_cycle(self, cycle: ops.Cycle) -> list[ops.Outcome]:
        """The outcomes ready: the cycle's, and those of earlier samples whose generation finished."""
        async with self._lock:
            self._unanswered.update((item.future_id, item) for item in cycle.items)
            started = time.monotonic()
            try:
                outcomes = await self._worker.run_cycle(cycle)
                if cycle.items:
                    self.recent_cycles.append(CycleSummary.of(cycle, time.monotonic() - started))
            except WorkerDied as error:
                # What died with it: this cycle, and the samples still generating from earlier ones.
                dying = ops.Cycle(cycle.cycle_id, list(self._unanswered.values()))
                self._unanswered.clear()
                log.error("the worker died during cycle %d (%s)", cycle.cycle_id, error)
                changing = {ops.run_of(item) for item in dying.items if not ops.reads_only(item.operation)}
                report = await self._replace(changing)
                if self.retired:
                    return [self._lost(item, cycle.cycle_id, f"{error}; {report}") for item in dying.items]
                outcomes = await self._rerun_what_may_run_again(dying, f"{error}; a new worker {report}")
            for outcome in outcomes:
                self._unanswered.pop(outcome.future_id, None)
            return outcomes

    async def _replace(self, changing: set[str]) -> str:
        """Restarts the worker here, or (when the platform has no room for a new one and another
        replica can take them) hands its runs over and retires."""
        if self.handover is not None and not self._platform.has_room() and await self.handover(changing):
            self.retired = True
            await self._worker.stop()
            return "its runs moved to other replicas of the base model, each from its own restore point"
        return await self._restart(changing)

    async def _rerun_what_may_run_again(self, cycle: ops.Cycle, what_happened: str) -> list[ops.Outcome]:
        """The dying cycle's outcomes: its read-only requests of runs that lost nothing, run again
        (once; samples still generating then answer with a later cycle); a clear error for the rest."""
        again = [
            item
            for item in cycle.items
            if ops.reads_only(item.operation) and self._runs.fence_of(ops.run_of(item)) is None
        ]
        outcomes = {}
        if again:
            self._unanswered.update((item.future_id, item) for item in again)
            try:
                outcomes = {
                    outcome.future_id: outcome
                    for outcome in await self._worker.run_cycle(ops.Cycle(cycle.cycle_id, again))
                }
            except WorkerDied as error:  # twice in a row: give up on this cycle
                log.error("the new worker died too (%s)", error)
                self._unanswered.clear()
        return [
            outcomes.get(item.future_id) or self._lost(item, cycle.cycle_id, what_happened)
            for item in cycle.items
            if item.future_id in outcomes or item.future_id not in self._unanswered
        ]

    def _lost(self, item: ops.WorkItem, cycle_id: int, what_happened: str) -> ops.Outcome:
        fence = self._runs.fence_of(ops.run_of(item))
        if fence is not None:
            error = ops.OpError(grpc.StatusCode.ABORTED.value[0], fence)
        else:
            message = f"the worker failed while running this request: {what_happened}; it did not run: send it again"
            error = ops.OpError(grpc.StatusCode.UNAVAILABLE.value[0], message)
        return ops.Outcome(item.future_id, cycle_id, error=error)

    async def _restart(self, changing: set[str]) -> str:
        """A new worker with every built live run back at its restore point; those that lose work
        (they had moved on from it, or were changing in the dying cycle) are fenced."""
        await self._set_serving(False)  # health: NOT_SERVING until the runs are back
        await self._worker.stop()
        self._worker = self._platform.replica(self._base_model, self._options)
        await self._worker.start()
        self.restarts += 1
        metrics.WORKER_RESTARTS.inc()
        restored, fenced, lost = 0, [], []
        for run in self._runs_here():
            if self._runs.is_closing(run.model_id):
                self._runs.close(run.model_id)  # its session closed: the crash did its unload
                continue
            if not self._runs.is_built(run.model_id):
                continue  # its creation is still queued: the new worker builds it
            error = await self._restore(run)
            if error is not None:
                self._runs.mark_lost(
                    run.model_id, f"its restore point {run.restore.describe()} failed to load: {error}"
                )
                lost.append(f"{run.model_id} ({error})")
                continue
            restored += 1
            self._runs.restored(run.model_id, run.restore)
            if run.diverged or run.model_id in changing:
                self._runs.fence(run.model_id, rollback_message(run, "the worker crashed"))
                fenced.append(run.model_id)
        log.warning(
            "worker restarted: %d run(s) restored, fenced %s, lost %s", restored, fenced or "none", lost or "none"
        )
        await self._set_serving(True)
        report = f"restored {restored} run(s), each from its own restore point"
        return report + (f"; runs that could not be restored: {', '.join(lost)}" if lost else "")

    async def _restore(self, run: TrainingRun) -> str | None:
        """Rebuilds the run's adapter at its restore point; the error, if that fails."""
        operation = self._runs.rebuild(run)
        (outcome,) = await self._worker.run_cycle(
            ops.Cycle(0, [ops.WorkItem(uuid.uuid4().hex, run.model_id, operation)])
        )
        return None if outcome.error is None else outcome.error.message
