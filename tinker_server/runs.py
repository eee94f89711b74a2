"""The front end's view of training runs: durable records in the store, plus what lives in
this server process (adapters loaded in the worker, checkpoint saves in flight)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from tinker_server import ops
from tinker_server.store import Checkpoint, CheckpointPath, RestorePoint, Sampler, Store, TrainingRun, initial_path


class Runs:
    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        # Runs whose adapter the current worker holds (on its device, or waiting in host memory
        # or on disk), by owner; others need a checkpoint to go on.
        self._live: dict[str, str] = {}
        # Live runs whose session closed: refused new requests and off their owner's count
        # while the worker finishes what was queued for them and unloads them.
        self._closing: set[str] = set()
        # Checkpoints being saved: reserved at submission so two saves cannot claim a name.
        self._saving: set[CheckpointPath] = set()
        # Runs a worker crash took and that could not be rebuilt, and why.
        self._lost: dict[str, str] = {}
        # Sampler weights in use: clients' holds on samplers, and each run's unnamed snapshots,
        # oldest first (a newer one replaces them once nothing holds them).
        self._holds: dict[str, int] = {}
        self._sampler_paths: dict[str, str] = {}
        self._ephemeral: dict[str, list[CheckpointPath]] = {}
        # After a crash, built runs come back from their restore points; those whose state had
        # moved on from it are fenced (with the message their requests fail with) until the
        # client acknowledges with load_state.
        self._built: set[str] = set()
        self._fences: dict[str, str] = {}

    def owned_run(self, model_id: str, owner: str) -> TrainingRun | None:
        """The run, if `owner` owns it: another owner's run does not exist for them."""
        run = self.store.run(model_id)
        return run if run is not None and run.owner == owner else None

    def live_count(self, owner: str) -> int:
        return sum(run_owner == owner and run not in self._closing for run, run_owner in self._live.items())

    def live_runs(self) -> list[TrainingRun]:
        return [run for model_id in sorted(self._live) if (run := self.store.run(model_id)) is not None]

    def mark_lost(self, model_id: str, reason: str) -> None:
        """A crash took its adapter and it could not be rebuilt; the record and checkpoints stay."""
        self._live.pop(model_id, None)
        self._forget_state(model_id)
        self._lost[model_id] = reason

    def lost_reason(self, model_id: str) -> str | None:
        return self._lost.get(model_id)

    def _forget_state(self, model_id: str) -> None:
        self._closing.discard(model_id)
        self._built.discard(model_id)
        self._fences.pop(model_id, None)

    def last_checkpoint(self, model_id: str, checkpoint_type: str) -> Checkpoint | None:
        kept = [c for c in self.store.checkpoints(model_id) if c.path.checkpoint_type == checkpoint_type]
        return kept[-1] if kept else None

    def is_live(self, model_id: str) -> bool:
        return model_id in self._live

    def is_closing(self, model_id: str) -> bool:
        return model_id in self._closing

    def begin_close(self, model_id: str) -> None:
        """The client closed the run's session: it takes no new request and no longer counts
        against its owner's limit; `close` follows once the worker has unloaded it."""
        self._closing.add(model_id)
        self.store.close_run(model_id)

    def close(self, model_id: str) -> None:
        """The client closed the run (its session): its adapter is freed; checkpoints stay."""
        self._live.pop(model_id, None)
        self._forget_state(model_id)
        self.store.close_run(model_id)

    def revive(self, run: TrainingRun) -> None:
        """A run of an earlier server process comes back (its adapter is being rebuilt)."""
        self._live[run.model_id] = run.owner
        self._lost.pop(run.model_id, None)

    # -- what a worker crash would cost ----------------------------------------------

    def note_built(self, model_id: str) -> None:
        """Its adapter exists on the worker."""
        self._built.add(model_id)

    def rebuild(self, run: TrainingRun) -> ops.CreateAdapter:
        """What rebuilds the run's adapter at its restore point."""
        point = run.restore
        if not point.path:
            return ops.CreateAdapter(run.lora)  # seeded: its creation comes back exactly
        directory = str(self.directory(CheckpointPath.parse(point.path)))
        return ops.CreateAdapter(run.lora, directory, point.with_optimizer)

    def restored(self, model_id: str, point: RestorePoint) -> None:
        """Its adapter was rebuilt at `point`: what it had done since is gone."""
        self.store.set_restore_point(model_id, point)
        self.store.forget_steps_from(model_id, point.step)
        self.store.touch_run(model_id, time.time(), gradients=False)
        self._built.add(model_id)

    def is_built(self, model_id: str) -> bool:
        return model_id in self._built

    def fence(self, model_id: str, message: str) -> None:
        """A crash took the run back: its requests fail with `message` until a load_state."""
        self._fences[model_id] = message

    def fence_of(self, model_id: str) -> str | None:
        return self._fences.get(model_id)

    def lift_fence(self, model_id: str) -> None:
        self._fences.pop(model_id, None)

    # -- what holds sampler weights --------------------------------------------------

    def owned_sampler(self, sampler_id: str, owner: str) -> Sampler | None:
        """The sampler, if `owner` made it: another owner's does not exist for them."""
        sampler = self.store.sampler(sampler_id)
        return sampler if sampler is not None and sampler.owner == owner else None

    def new_sampler(
        self, owner: str, session_id: str, base_model: str, model_path: str, record_stability_info: bool
    ) -> Sampler:
        """Registers a sampler; its creator holds it."""
        sampler_id = f"sampler-{secrets.token_hex(8)}"
        sampler = Sampler(sampler_id, owner, session_id, base_model, model_path, record_stability_info, time.time())
        self.store.add_sampler(sampler)
        self.hold_sampler(sampler_id, model_path, +1)
        return sampler

    def forget_samplers(self, model_path: str) -> None:
        """The weights at `model_path` are deleted: their samplers go with them."""
        for sampler_id in [sampler for sampler, path in self._sampler_paths.items() if path == model_path]:
            del self._sampler_paths[sampler_id]
            self._holds.pop(sampler_id, None)
        self.store.delete_samplers(model_path)

    def hold_sampler(self, sampler_id: str, model_path: str, change: int) -> None:
        """A sampling client (an instance of it, in any process) took (+1) or let go (-1) of it."""
        self._sampler_paths[sampler_id] = model_path
        self._holds[sampler_id] = max(0, self._holds.get(sampler_id, 0) + change)

    def add_ephemeral(self, path: CheckpointPath) -> None:
        self._ephemeral.setdefault(path.model_id, []).append(path)

    def replaced_snapshots(self) -> list[CheckpointPath]:
        """Unnamed snapshots that a newer one of their run replaced and no sampling client holds;
        forgotten here (their deletion is the caller's)."""
        held = {path for sampler, path in self._sampler_paths.items() if self._holds.get(sampler, 0) > 0}
        released = []
        for model_id, paths in self._ephemeral.items():
            *older, newest = paths
            kept = [path for path in older if str(path) in held]
            released += [path for path in older if str(path) not in held]
            self._ephemeral[model_id] = [*kept, newest]
        return released

    def add_live(self, run: TrainingRun) -> None:
        self.store.add_run(run)
        self._live[run.model_id] = run.owner

    def drop(self, model_id: str) -> None:
        self._live.pop(model_id, None)
        self._forget_state(model_id)
        self.store.remove_run(model_id)

    def checkpoint_exists(self, path: CheckpointPath) -> bool:
        return path in self._saving or self.store.checkpoint(path) is not None

    def reserve(self, path: CheckpointPath) -> None:
        self._saving.add(path)

    def release(self, path: CheckpointPath) -> None:
        self._saving.discard(path)

    def checkpoint(self, path: CheckpointPath) -> Checkpoint | None:
        return self.store.checkpoint(path)

    def readable_checkpoint(self, path: CheckpointPath, owner: str) -> tuple[Checkpoint, TrainingRun] | None:
        """The checkpoint and its run, if `owner` may read it: theirs, or published."""
        checkpoint, run = self.store.checkpoint(path), self.store.run(path.model_id)
        if checkpoint is None or run is None or not (run.owner == owner or checkpoint.public):
            return None
        return checkpoint, run

    def directory(self, path: CheckpointPath) -> Path:
        return path.directory(self.data_dir)


def rollback_message(run: TrainingRun, cause: str) -> str:
    """What a fenced run's requests fail with: where `cause` took it, and how to go on."""
    point = run.restore
    return (
        f"{cause}, and training run {run.model_id} went back to {point.describe()} (step {point.step}): what it did "
        f"after that is lost. Call load_state('{point.path or initial_path(run.model_id)}') to go on from there"
    )
