"""The replicas of every served base model, and where each training run lives on them.

Each replica is a worker (a local process or a Ray actor, under supervision) with its own
scheduler. A new run goes to the least loaded replica of its base model that has room; its
placement (replica, epoch) is recorded in the store, and its requests, and samples of the
weights it saved, are routed there. A run moves only through a checkpoint: its queued requests
move with it, held behind the load on the new replica, so its order never changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from tinker_server import metrics, ops
from tinker_server.api.dispatch import status_code
from tinker_server.api.requests import RequestError
from tinker_server.recovery import CycleSummary, SupervisedWorker
from tinker_server.runs import Runs, rollback_message
from tinker_server.scheduler import CyclePolicy, Gate, Scheduler, Ticket, admit_all
from tinker_server.store import Placement, TrainingRun
from tinker_server.worker.platform import WorkerPlatform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One served base model: where it comes from, the name clients use, how many replicas."""

    path: str | None = None
    """A local Hugging Face model directory; None: the embedded default model."""
    name: str | None = None
    """None: the embedded model's own name, or the directory."""
    replicas: int = 1


@dataclass(frozen=True)
class FleetOptions:
    worker: ops.WorkerOptions
    cycle: CyclePolicy
    max_cycle_tokens: int
    max_runs_per_replica: int
    sweep_interval_seconds: float


@dataclass
class ReplicaSlot:
    """One replica: its worker, its scheduler, and the tasks that drive them."""

    replica_id: str
    spec: ModelSpec
    worker: SupervisedWorker
    scheduler: Scheduler
    base_model: str = ""
    draining: bool = False
    """No new runs; its runs are moving off it."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def serving(self) -> bool:
        return not self.draining and not self.worker.retired


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    base_model: str
    location: str
    runs: tuple[str, ...]
    queued: int
    state: str
    restarts: int = 0
    """Workers that replaced a crashed one here."""
    residency: ops.ResidencyStats = ops.ResidencyStats()
    recent_cycles: tuple[CycleSummary, ...] = ()


class Fleet:
    def __init__(
        self,
        platform: WorkerPlatform,
        options: FleetOptions,
        runs: Runs,
        set_serving: Callable[[bool], Awaitable[None]],
    ) -> None:
        self.platform = platform
        self._options = options
        self._runs = runs
        self._set_serving = set_serving
        self._slots: dict[str, ReplicaSlot] = {}  # by replica id, oldest first
        self._placed: dict[str, Placement] = {}  # live runs' placements, as recorded in the store
        self._spill_dirs = 0
        self._moving = asyncio.Lock()  # one migration (or drain, rebalance) at a time
        self.gate: Gate = admit_all
        metrics.QUEUE_DEPTH.set_function(self.queued)

    # -- replicas ----------------------------------------------------------------------

    async def start(self, specs: list[ModelSpec]) -> dict[str, ops.ModelInfo]:
        """Starts every replica of every model, all at once; returns each model's info by name."""
        slots = [self._new_slot(spec) for spec in specs for _ in range(spec.replicas)]
        infos = await asyncio.gather(*(slot.worker.start() for slot in slots))
        models: dict[str, ops.ModelInfo] = {}
        for slot, info in zip(slots, infos, strict=True):
            info = dataclasses.replace(info, name=slot.spec.name) if slot.spec.name else info
            models.setdefault(info.name, info)
            self._admit(slot, info.name)
        if len(models) != len(specs):
            raise ValueError(f"two served base models have the same name: {[s.name or s.path for s in specs]}")
        return models

    def _new_slot(self, spec: ModelSpec) -> ReplicaSlot:
        options = self._options.worker
        if options.spill_dir:  # each replica offloads to its own directory (it clears it at start)
            options = dataclasses.replace(options, spill_dir=f"{options.spill_dir}/{self._spill_dirs}")
            self._spill_dirs += 1
        slot: ReplicaSlot
        worker = SupervisedWorker(
            self.platform, spec.path, options, self._runs, lambda: self.runs_on(slot), self._set_serving
        )
        scheduler = Scheduler(worker.run_cycle, self._options.cycle, self._options.max_cycle_tokens, worker)
        slot = ReplicaSlot("", spec, worker, scheduler)
        worker.handover = lambda changing: self._hand_over(slot, changing)
        return slot

    def _admit(self, slot: ReplicaSlot, base_model: str) -> None:
        """Names the started replica and starts driving it."""
        number = sum(s.base_model == base_model for s in self._slots.values())
        while f"{base_model}/{number}" in self._slots:
            number += 1
        slot.replica_id, slot.base_model = f"{base_model}/{number}", base_model
        slot.scheduler.gate = lambda items: self.gate(items)
        self._slots[slot.replica_id] = slot
        slot.tasks = [
            asyncio.create_task(slot.scheduler.run(), name=f"scheduler {slot.replica_id}"),
            asyncio.create_task(slot.worker.watch(), name=f"watch {slot.replica_id}"),
            # An empty cycle lets the worker move idle adapters off its device even when no one trains.
            asyncio.create_task(self._settle_residency(slot), name=f"residency {slot.replica_id}"),
        ]
        for task in slot.tasks:
            task.add_done_callback(_log_failure)
        log.info("replica %s ready (%s)", slot.replica_id, slot.worker.where())

    async def _settle_residency(self, slot: ReplicaSlot) -> None:
        while slot.serving:
            await asyncio.sleep(self._options.sweep_interval_seconds)
            slot.scheduler.tick()

    async def add_replica(self, base_model: str) -> ReplicaSlot:
        """One more replica of a served model; existing runs stay where they are (see rebalance)."""
        spec = next((slot.spec for slot in self._slots.values() if slot.base_model == base_model), None)
        if spec is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"base_model {base_model!r} is not served here")
        slot = self._new_slot(spec)
        await slot.worker.start()
        self._admit(slot, base_model)
        return slot

    async def drain_queues(self, grace: float) -> None:
        """Waits, up to `grace`, until everything queued ran; fails what is left."""
        await asyncio.gather(*(slot.scheduler.drain(grace) for slot in self._slots.values()))

    async def stop(self) -> None:
        for slot in self._slots.values():
            for task in slot.tasks:
                task.cancel()
        await asyncio.gather(*(t for slot in self._slots.values() for t in slot.tasks), return_exceptions=True)
        await asyncio.gather(*(slot.worker.stop() for slot in self._slots.values()))
        self.platform.close()

    # -- what the rest of the server reads ------------------------------------------

    def queued(self) -> int:
        """Requests waiting for a cycle on every replica; safe to call from any thread."""
        return sum(slot.scheduler.queued() for slot in list(self._slots.values()))

    def residency(self) -> ops.ResidencyStats:
        """Where adapters are, summed over the replicas."""
        return sum((slot.worker.residency for slot in self._slots.values()), ops.ResidencyStats())

    def statuses(self) -> list[ReplicaStatus]:
        return [
            ReplicaStatus(
                slot.replica_id,
                slot.base_model,
                slot.worker.where(),
                tuple(run.model_id for run in self.runs_on(slot)),
                slot.scheduler.queued(),
                "retired" if slot.worker.retired else "draining" if slot.draining else "serving",
                slot.worker.restarts,
                slot.worker.residency,
                tuple(slot.worker.recent_cycles),
            )
            for slot in self._slots.values()
        ]

    def placement(self, model_id: str) -> Placement | None:
        return self._placed.get(model_id)

    def runs_on(self, slot: ReplicaSlot) -> list[TrainingRun]:
        return [run for run in self._runs.live_runs() if self._home(run.model_id) is slot]

    def _home(self, model_id: str) -> ReplicaSlot | None:
        placement = self._placed.get(model_id)
        return self._slots.get(placement.replica) if placement and self._runs.is_live(model_id) else None

    def _replicas_of(self, base_model: str) -> list[ReplicaSlot]:
        return [slot for slot in self._slots.values() if slot.base_model == base_model and slot.serving]

    def _load(self, slot: ReplicaSlot) -> int:
        return sum(self._home(model_id) is slot for model_id in self._placed)

    # -- placement and routing -------------------------------------------------------

    def choose(self, base_model: str, instead_of: ReplicaSlot | None = None) -> ReplicaSlot:
        """The least loaded serving replica of `base_model` with room for one more run."""
        limit = self._options.max_runs_per_replica
        candidates = [
            slot for slot in self._replicas_of(base_model) if slot is not instead_of and self._load(slot) < limit
        ]
        if not candidates:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"every replica of {base_model} holds {limit} runs (--max-runs-per-replica); "
                "close a session to free one, or add a replica (tinker-server admin add-replica)",
            )
        return min(candidates, key=self._load)

    def place(self, model_id: str, slot: ReplicaSlot) -> None:
        """Records that the run lives on `slot` from now on (one epoch further)."""
        recorded = self._placed.get(model_id) or self._runs.store.placement(model_id)
        placement = Placement(slot.replica_id, recorded.epoch + 1)
        self._placed = {run: where for run, where in self._placed.items() if self._runs.is_live(run)}
        self._placed[model_id] = placement
        self._runs.store.set_placement(model_id, placement)

    def place_revived(self, run: TrainingRun) -> None:
        """A run of an earlier server process: back on the replica it had, if it is served."""
        recorded = self._slots.get(self._runs.store.placement(run.model_id).replica)
        self.place(run.model_id, recorded if recorded and recorded.serving else self.choose(run.base_model))

    def submit(self, queue_key: str, item: ops.WorkItem, base_model: str = "", first: bool = False) -> Ticket:
        """Queues `item` on the replica it must run on: its run's, else the least busy of its base model's."""
        return self._scheduler_for(item, base_model).submit(queue_key, item, first)

    def _scheduler_for(self, item: ops.WorkItem, base_model: str) -> Scheduler:
        run = ops.home_run(item)
        if (home := self._home(run)) is not None:
            return home.scheduler
        if run:
            base_model = self._runs.store.run(run).base_model
        replicas = self._replicas_of(base_model)
        if not replicas:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no replica of {base_model} is serving")
        return min(replicas, key=lambda slot: slot.scheduler.queued()).scheduler

    def rebuild(self, run: TrainingRun, cause: str) -> None:
        """Queues the rebuild of the run's adapter at its restore point on its replica, ahead of its
        requests; if that fails, the run is lost and its requests fail saying so."""
        point = run.restore
        item = ops.WorkItem("", run.model_id, self._runs.rebuild(run))
        ticket = self.submit(run.model_id, item, first=True)

        def settle(done: asyncio.Future[ops.Outcome]) -> None:
            error = done.result().error
            if error is None:
                self._runs.restored(run.model_id, point)
                return
            reason = f"{cause}, and its restore point {point.describe()} failed to load ({error.message})"
            self._runs.mark_lost(run.model_id, reason)
            self._runs.fence(run.model_id, reason)  # what was queued behind it fails saying so

        ticket.outcome.add_done_callback(settle)

    # -- moving runs ---------------------------------------------------------------------

    async def migrate(self, model_id: str, target_id: str | None = None) -> Placement:
        """Moves a live run to `target_id` (None: the least loaded other replica): its in-flight
        requests finish where they are, its adapter, Adam state and pending gradients go through a
        checkpoint on shared storage, and its queued requests follow, in order, behind the load."""
        async with self._moving:
            return await self._migrate(model_id, target_id)

    async def _migrate(self, model_id: str, target_id: str | None) -> Placement:
        source = self._home(model_id)
        run = self._runs.store.run(model_id)
        if source is None or run is None or not self._runs.is_built(model_id):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"model_id {model_id!r}: not a live, built run")
        if self._runs.fence_of(model_id) is not None:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model_id {model_id!r}: a crash took it back and its client has not acknowledged (load_state) yet",
            )
        target = self._target(run, source, target_id)
        if target is source:
            return self._placed[model_id]
        directory = self._runs.data_dir / "migrations" / f"{model_id}.{self._placed[model_id].epoch}"
        target.scheduler.hold(model_id)  # what arrives from now on waits there, behind the load
        self._placed[model_id] = Placement(target.replica_id, self._placed[model_id].epoch)
        target.scheduler.put_back(source.scheduler.take(model_id))
        restarts = source.worker.restarts
        try:
            save = ops.SaveState("", str(directory), with_gradients=True, base_model=run.base_model)
            saved = await source.scheduler.submit(model_id, ops.WorkItem("", model_id, save)).outcome
            if saved.error is not None:
                self._undo_move(model_id, source, target, saved.error.message, source.worker.restarts != restarts)
                reason = f"model_id {model_id!r} stays where it was: {saved.error.message}"
                raise RequestError(status_code(saved.error.code), reason)
            await source.scheduler.submit(model_id, ops.WorkItem("", model_id, ops.Unload())).outcome
            load = ops.CreateAdapter(run.lora, str(directory), with_optimizer=True, with_gradients=True)
            loading = target.scheduler.submit(model_id, ops.WorkItem("", model_id, load), first=True)
            target.scheduler.release(model_id)
            loaded = await loading.outcome
            if loaded.error is not None:
                reason = f"it failed to load on replica {target.replica_id} while moving ({loaded.error.message})"
                self._runs.mark_lost(model_id, reason)
                self._runs.fence(model_id, reason)
                raise RequestError(status_code(loaded.error.code), f"model_id {model_id!r}: {reason}")
        finally:
            target.scheduler.release(model_id)
            shutil.rmtree(directory, ignore_errors=True)
        self.place(model_id, target)
        log.info("run %s moved from %s to %s", model_id, source.replica_id, target.replica_id)
        return self._placed[model_id]

    def _target(self, run: TrainingRun, source: ReplicaSlot, target_id: str | None) -> ReplicaSlot:
        if target_id is None:
            return self.choose(run.base_model, instead_of=source)
        target = self._slots.get(target_id)
        if target is None or not target.serving or target.base_model != run.base_model:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"replica_id {target_id!r}: no serving replica of {run.base_model} by that id; "
                f"serving: {[slot.replica_id for slot in self._replicas_of(run.base_model)]}",
            )
        return target

    def _undo_move(
        self, model_id: str, source: ReplicaSlot, target: ReplicaSlot, why: str, source_restarted: bool
    ) -> None:
        """A move whose checkpoint failed: the run stays on its replica. If that replica's worker
        died meanwhile (its restart skipped this run, then placed elsewhere), the run comes back
        from its restore point, there or on the target if that replica is gone."""
        log.warning("run %s could not move to %s: %s", model_id, target.replica_id, why)
        if source.serving:
            self._placed[model_id] = Placement(source.replica_id, self._placed[model_id].epoch)
            source.scheduler.put_back(target.scheduler.take(model_id))
        else:
            self.place(model_id, target)
        if source_restarted or not source.serving:
            run = self._runs.store.run(model_id)
            cause = f"its replica {source.replica_id} failed while it moved"
            if run.diverged:
                self._runs.fence(model_id, rollback_message(run, cause))
            self.rebuild(run, cause)

    async def drain(self, replica_id: str) -> list[str]:
        """Moves every run off a replica, then stops it (to free its GPU); returns the runs moved."""
        async with self._moving:
            slot = self._slots.get(replica_id)
            if slot is None or not slot.serving:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"replica_id {replica_id!r}: no serving replica")
            if len(self._replicas_of(slot.base_model)) < 2:
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"replica_id {replica_id!r}: the last replica of {slot.base_model}; add one first",
                )
            slot.draining = True
            moved = []
            for run in self.runs_on(slot):
                await self._migrate(run.model_id, None)
                moved.append(run.model_id)
            await self._retire(slot)
            return moved

    async def rebalance(self, base_model: str) -> list[str]:
        """Moves runs from the most to the least loaded replicas of `base_model` until their loads
        differ by at most one; returns the runs moved."""
        async with self._moving:
            moved = []
            while len(replicas := self._replicas_of(base_model)) > 1:
                busiest, idlest = max(replicas, key=self._load), min(replicas, key=self._load)
                movable = [run for run in self.runs_on(busiest) if self._runs.fence_of(run.model_id) is None]
                if self._load(busiest) - self._load(idlest) <= 1 or not movable:
                    break
                await self._migrate(movable[-1].model_id, idlest.replica_id)
                moved.append(movable[-1].model_id)
            return moved

    async def _retire(self, slot: ReplicaSlot) -> None:
        """Stops a replica with no runs: samples of the base model queued on it go to another, those
        generating there finish first."""
        others = self._replicas_of(slot.base_model)
        if others:
            others[0].scheduler.put_back(slot.scheduler.take())
        while slot.scheduler.answering():
            await asyncio.sleep(0.05)
        slot.scheduler.close()
        for task in slot.tasks:
            task.cancel()
        await slot.worker.stop()
        del self._slots[slot.replica_id]
        log.info("replica %s stopped", slot.replica_id)

    async def _hand_over(self, dead: ReplicaSlot, changing: set[str]) -> bool:
        """A replica whose worker died and cannot be replaced (no room on the platform): its runs
        go to the other replicas of its base model, each rebuilt from its restore point, fenced
        if that loses work, their queued requests behind the rebuild. False if there is no other."""
        others = [slot for slot in self._replicas_of(dead.base_model) if slot is not dead]
        if not others:
            return False
        cause = f"its replica {dead.replica_id} was lost"
        dead.scheduler.close()
        for run in self.runs_on(dead):
            target = min(others, key=self._load)
            self.place(run.model_id, target)
            target.scheduler.put_back(dead.scheduler.take(run.model_id))
            if not self._runs.is_built(run.model_id):
                continue  # its creation is among what moved: it is built there
            if run.diverged or run.model_id in changing:
                self._runs.fence(run.model_id, rollback_message(run, cause))
            self.rebuild(run, cause)
        others[0].scheduler.put_back(dead.scheduler.take())  # the bare base model's, and closed runs' deletions
        log.error("replica %s lost; its runs moved to %s", dead.replica_id, [slot.replica_id for slot in others])
        return True


def _log_failure(task: asyncio.Task[None]) -> None:
    """A replica's clock or watch that stopped on an error says so (nothing else awaits them)."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("%s stopped: %s", task.get_name(), error, exc_info=error)
