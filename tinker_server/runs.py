"""The front end's view of training runs: durable records in the store, plus what lives in
this server process (adapters loaded in the worker, checkpoint saves in flight)."""

from __future__ import annotations

from pathlib import Path

from tinker_server.store import Checkpoint, CheckpointPath, Store, TrainingRun


class Runs:
    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        # Runs whose adapter the current worker holds; others need a checkpoint to go on.
        self._live: set[str] = set()
        # Checkpoints being saved: reserved at submission so two saves cannot claim a name.
        self._saving: set[CheckpointPath] = set()

    def owned_run(self, model_id: str, owner: str) -> TrainingRun | None:
        """The run, if `owner` owns it: another owner's run does not exist for them."""
        run = self.store.run(model_id)
        return run if run is not None and run.owner == owner else None

    def live_count(self) -> int:
        return len(self._live)

    def live_runs(self) -> list[TrainingRun]:
        return [run for model_id in sorted(self._live) if (run := self.store.run(model_id)) is not None]

    def mark_lost(self, model_id: str) -> None:
        """Its adapter is gone from the worker (a crash); the record and checkpoints stay."""
        self._live.discard(model_id)

    def last_checkpoint(self, model_id: str, checkpoint_type: str) -> Checkpoint | None:
        kept = [c for c in self.store.checkpoints(model_id) if c.path.checkpoint_type == checkpoint_type]
        return kept[-1] if kept else None

    def is_live(self, model_id: str) -> bool:
        return model_id in self._live

    def add_live(self, run: TrainingRun) -> None:
        self.store.add_run(run)
        self._live.add(run.model_id)

    def drop(self, model_id: str) -> None:
        self._live.discard(model_id)
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
