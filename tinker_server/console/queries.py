"""What the console's pages show, read from the server's own records: the store, the runs this
process holds, and the fleet of replicas. Every lookup answers only what the visitor may see."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from tinker_server.console.sessions import Visitor
from tinker_server.fleet import Fleet, ReplicaStatus
from tinker_server.recovery import CycleSummary
from tinker_server.runs import Runs
from tinker_server.store import TINKER_SCHEME, Checkpoint, CheckpointPath, Sampler, TrainingRun

LISTED_RUNS = 200
SHOWN_CYCLES = 20
SERIES = ("loss_per_token", "grad_norm", "learning_rate", "tokens")
"""The curves of a run page, each a StepMetrics field over steps."""


@dataclass(frozen=True)
class RunRow:
    run: TrainingRun
    status: str
    """resident (its adapter on a device), offloaded (in host memory or on disk, back on its next
    request), lost (a crash took it and it could not be rebuilt) or closed (its client closed it)."""
    lost_reason: str | None = None


@dataclass(frozen=True)
class BaseModelLoad:
    base_model: str
    queued: int
    replicas: list[ReplicaStatus]


@dataclass(frozen=True)
class ServerView:
    models: list[BaseModelLoad]
    cycles: list[tuple[str, CycleSummary]]
    """The latest cycles of every replica, newest first, with the replica's id."""

    @property
    def mean_cycle_seconds(self) -> float | None:
        return sum(c.seconds for _, c in self.cycles) / len(self.cycles) if self.cycles else None


class ConsoleQueries:
    def __init__(self, runs: Runs, fleet: Fleet) -> None:
        self._runs = runs
        self._fleet = fleet

    def runs(self, visitor: Visitor) -> tuple[list[RunRow], int]:
        """The newest runs the visitor may see (an admin: everyone's), and how many there are."""
        runs, total = self._runs.store.runs(None if visitor.admin else visitor.owner, LISTED_RUNS, 0)
        offloaded = set(self._fleet.residency().offloaded_runs)
        return [self._row(run, offloaded) for run in runs], total

    def run(self, visitor: Visitor, model_id: str) -> RunRow | None:
        """None for another owner's run: for the visitor it does not exist."""
        run = self._runs.store.run(model_id)
        if run is None or not visitor.may_see(run.owner):
            return None
        return self._row(run, set(self._fleet.residency().offloaded_runs))

    def _row(self, run: TrainingRun, offloaded: set[str]) -> RunRow:
        if (reason := self._runs.lost_reason(run.model_id)) is not None:
            return RunRow(run, "lost", reason)
        if run.closed:
            return RunRow(run, "closed")
        resident = self._runs.is_live(run.model_id) and run.model_id not in offloaded
        return RunRow(run, "resident" if resident else "offloaded")

    def checkpoints(self, model_id: str) -> list[Checkpoint]:
        return self._runs.store.checkpoints(model_id)

    def samplers(self, model_id: str) -> list[Sampler]:
        return self._runs.store.run_samplers(model_id)

    def metrics(self, model_id: str) -> dict[str, list[float | int | None]]:
        """The run's curves as columns: `step`, then one list per series (None where a step has no
        value yet, e.g. the learning rate of a step whose optim_step has not run)."""
        points = self._runs.store.step_metrics(model_id)
        columns: dict[str, list[float | int | None]] = {"step": [point.step for point in points]}
        for name in SERIES:
            columns[name] = [_finite(getattr(point, name)) for point in points]
        return columns

    def checkpoint_directory(self, visitor: Visitor, model_id: str, segment: str, name: str) -> Path | None:
        """Where a checkpoint the visitor may download lies; None if there is no such checkpoint for them."""
        try:
            path = CheckpointPath.parse(f"{TINKER_SCHEME}{model_id}/{segment}/{name}")
        except ValueError:
            return None
        if self.run(visitor, model_id) is None or self._runs.checkpoint(path) is None:
            return None
        return self._runs.directory(path)

    def external_files(self, path: CheckpointPath) -> Path | None:
        """The directory of an external checkpoint that still exists and has not expired (whoever
        asks: the caller checks a signed URL's authority); None if there is none."""
        checkpoint = self._runs.checkpoint(path) if path.checkpoint_type == "external" else None
        if checkpoint is None or (checkpoint.expires_at is not None and checkpoint.expires_at <= time.time()):
            return None
        directory = self._runs.directory(path)
        return directory if directory.is_dir() else None

    def server(self) -> ServerView:
        statuses = self._fleet.statuses()
        models = [
            BaseModelLoad(name, sum(s.queued for s in replicas), replicas)
            for name in dict.fromkeys(s.base_model for s in statuses)
            if (replicas := [s for s in statuses if s.base_model == name])
        ]
        cycles = [(status.replica_id, cycle) for status in statuses for cycle in status.recent_cycles]
        cycles.sort(key=lambda entry: entry[1].ended_at, reverse=True)
        return ServerView(models, cycles[:SHOWN_CYCLES])


def _finite(value: float | int | None) -> float | int | None:
    """JSON has no NaN or infinity: a diverged step shows as a gap."""
    return value if value is None or math.isfinite(value) else None
