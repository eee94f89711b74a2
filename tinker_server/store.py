"""The durable record of the server: training runs, checkpoints and completed futures' results.

SQLite in --data-dir (WAL mode), schema versioned with `PRAGMA user_version`; checkpoint
files live beside it under runs/<model_id>/. One connection, used from the event loop
thread only: every statement here is a short, indexed lookup or write.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from tinker_server.ops import LoraSpec

CheckpointType = Literal["training", "sampler", "external"]
TINKER_SCHEME = "tinker://"
_PATH_SEGMENTS: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
_SEGMENT_OF = {kind: segment for segment, kind in _PATH_SEGMENTS.items()}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def is_safe_name(text: str) -> bool:
    """1-128 characters from [A-Za-z0-9._-], not starting with '.': a name that is safe as a
    directory name (never '..', a separator or a trailing newline)."""
    return _SAFE_NAME.fullmatch(text) is not None


# Each entry upgrades the schema by one version; never edit one that has shipped.
MIGRATIONS = [
    """
    CREATE TABLE training_runs (
        model_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        base_model TEXT NOT NULL,
        lora_rank INTEGER NOT NULL,
        lora_seed INTEGER NOT NULL,
        train_mlp INTEGER NOT NULL,
        train_attn INTEGER NOT NULL,
        train_unembed INTEGER NOT NULL,
        lora_alpha REAL NOT NULL,
        user_metadata TEXT NOT NULL,
        created_at REAL NOT NULL,
        last_request_time REAL NOT NULL
    );
    CREATE TABLE checkpoints (
        model_id TEXT NOT NULL REFERENCES training_runs(model_id),
        checkpoint_type TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        size_bytes INTEGER NOT NULL,
        expires_at REAL,
        PRIMARY KEY (model_id, checkpoint_type, name)
    );
    CREATE INDEX checkpoints_expiry ON checkpoints(expires_at) WHERE expires_at IS NOT NULL;
    CREATE TABLE future_results (
        future_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        result BLOB NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX future_results_expiry ON future_results(expires_at);
    """,
    """
    ALTER TABLE training_runs ADD COLUMN session_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE training_runs ADD COLUMN project_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE training_runs ADD COLUMN optimizer TEXT NOT NULL DEFAULT 'adamw';
    ALTER TABLE checkpoints ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE checkpoints ADD COLUMN user_metadata TEXT NOT NULL DEFAULT '{}';
    CREATE INDEX checkpoints_public ON checkpoints(model_id) WHERE public = 1;
    CREATE TABLE sessions (
        session_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        project_id TEXT NOT NULL,
        display_name TEXT NOT NULL,
        user_metadata TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX sessions_owner ON sessions(owner, created_at);
    CREATE TABLE samplers (
        sampler_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        session_id TEXT NOT NULL,
        base_model TEXT NOT NULL,
        model_path TEXT NOT NULL,
        record_stability_info INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX samplers_session ON samplers(session_id);
    CREATE TABLE sampled_sequences (
        sequence_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        prompt BLOB NOT NULL,
        tokens BLOB NOT NULL,
        logprobs BLOB NOT NULL,
        last_used REAL NOT NULL
    );
    CREATE INDEX sampled_sequences_last_used ON sampled_sequences(last_used);
    """,
    """
    ALTER TABLE training_runs ADD COLUMN trained_modules TEXT NOT NULL DEFAULT '[]';
    """,
    """
    CREATE TABLE expired_sequences (
        sequence_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        expired_at REAL NOT NULL
    );
    CREATE INDEX sampled_sequences_owner ON sampled_sequences(owner, last_used);
    CREATE INDEX samplers_path ON samplers(model_path);
    """,
    """
    CREATE TABLE accepted_requests (
        future_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        seq INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX accepted_requests_key ON accepted_requests(owner, idempotency_key)
        WHERE idempotency_key != '';
    CREATE INDEX accepted_requests_expiry ON accepted_requests(expires_at);
    CREATE TABLE queue_seqs (
        queue_key TEXT PRIMARY KEY,
        seq INTEGER NOT NULL
    );
    ALTER TABLE training_runs ADD COLUMN steps INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE training_runs ADD COLUMN restore_path TEXT NOT NULL DEFAULT '';
    ALTER TABLE training_runs ADD COLUMN restore_with_optimizer INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE training_runs ADD COLUMN restore_step INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE checkpoints ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
    """,
    """
    ALTER TABLE training_runs ADD COLUMN pending_gradients INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE training_runs ADD COLUMN closed INTEGER NOT NULL DEFAULT 0;
    """,
    """
    DROP INDEX accepted_requests_expiry;
    ALTER TABLE accepted_requests DROP COLUMN expires_at;
    """,
    """
    ALTER TABLE training_runs ADD COLUMN replica TEXT NOT NULL DEFAULT '';
    ALTER TABLE training_runs ADD COLUMN placement_epoch INTEGER NOT NULL DEFAULT 0;
    """,
    """
    CREATE TABLE step_metrics (
        model_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        recorded_at REAL NOT NULL,
        loss_sum REAL NOT NULL,
        loss_weight REAL NOT NULL,
        tokens INTEGER NOT NULL,
        learning_rate REAL,
        grad_norm REAL,
        PRIMARY KEY (model_id, step)
    ) WITHOUT ROWID;
    """,
]


@dataclass(frozen=True)
class CheckpointPath:
    """tinker://<model_id>/<weights|sampler_weights|external_weights>/<name>"""

    model_id: str
    checkpoint_type: CheckpointType
    name: str

    @classmethod
    def parse(cls, path: str) -> CheckpointPath:
        """Raises ValueError with the expected form."""
        parts = path.removeprefix(TINKER_SCHEME).split("/") if path.startswith(TINKER_SCHEME) else []
        # Both ends become directory names: never '..', separators or anything odd.
        if len(parts) != 3 or parts[1] not in _PATH_SEGMENTS or not all(map(is_safe_name, parts[::2])):
            raise ValueError(
                f"{path!r} is not a checkpoint path; expected tinker://<run>/weights/<name>, "
                "tinker://<run>/sampler_weights/<name> or tinker://<run>/external_weights/<name>"
            )
        return cls(parts[0], _PATH_SEGMENTS[parts[1]], parts[2])

    @property
    def checkpoint_id(self) -> str:
        return f"{_SEGMENT_OF[self.checkpoint_type]}/{self.name}"

    def __str__(self) -> str:
        return f"{TINKER_SCHEME}{self.model_id}/{self.checkpoint_id}"

    def directory(self, data_dir: Path) -> Path:
        return data_dir / "runs" / self.model_id / _SEGMENT_OF[self.checkpoint_type] / self.name


INFLIGHT = "inflight"


def initial_path(model_id: str) -> str:
    """Names a run's state at its creation (rebuilt from its seed) for load_state."""
    return f"{TINKER_SCHEME}{model_id}/initial"


def inflight_run(path: str) -> str | None:
    """The run of an in-flight sampler path, tinker://<run>/inflight (its live weights); None for
    any other path."""
    parts = path.removeprefix(TINKER_SCHEME).split("/") if path.startswith(TINKER_SCHEME) else []
    if len(parts) == 2 and parts[1] == INFLIGHT and is_safe_name(parts[0]):
        return parts[0]
    return None


@dataclass(frozen=True)
class RestorePoint:
    """What a run's state is rebuilt from when its worker dies: its seeded creation (no `path`),
    or the training checkpoint it last saved or loaded; and the optimizer steps it had taken then."""

    path: str = ""
    with_optimizer: bool = False
    step: int = 0

    def describe(self) -> str:
        return self.path or "its creation"


@dataclass
class TrainingRun:
    model_id: str
    owner: str
    base_model: str
    lora: LoraSpec
    user_metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)
    session_id: str = ""
    project_id: str = ""
    optimizer: str = "adamw"
    trained_modules: list[str] = field(default_factory=list)
    """The weights its adapter adapts, by path, as the worker built it."""
    steps: int = 0
    """Optimizer steps applied to its current state."""
    restore: RestorePoint = RestorePoint()
    pending_gradients: bool = False
    """It holds gradients no optimizer step consumed yet."""
    closed: bool = False
    """Its client closed it (its session): it is never brought back."""

    @property
    def diverged(self) -> bool:
        """Its state moved on from its restore point: rebuilding it from there loses work."""
        return self.steps > self.restore.step or self.pending_gradients


@dataclass(frozen=True)
class Placement:
    """Where a run's adapter lives: a replica of its base model, and how many times it moved
    (a result from an earlier epoch's replica is never taken for the run's)."""

    replica: str = ""
    epoch: int = 0


@dataclass
class Session:
    """A client's session (one ServiceClient): labels for the runs and samplers it creates."""

    session_id: str
    owner: str
    created_at: float
    project_id: str = ""
    display_name: str = ""
    user_metadata: dict[str, str] = field(default_factory=dict)
    status: str = ""
    """How it ended ("success", "errored", "interrupted"); empty while open."""
    detail: str = ""


@dataclass
class Sampler:
    """A sampling client the server registered: what it samples."""

    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    model_path: str
    record_stability_info: bool
    created_at: float


@dataclass
class Checkpoint:
    path: CheckpointPath
    created_at: float
    size_bytes: int
    expires_at: float | None
    public: bool = False
    user_metadata: dict[str, str] = field(default_factory=dict)
    step: int = 0
    """Optimizer steps its run had applied when it was saved."""


_RUN_FIELDS = (
    "model_id, owner, base_model, lora_rank, lora_seed, train_mlp, train_attn, train_unembed, lora_alpha, "
    "user_metadata, created_at, last_request_time, session_id, project_id, optimizer, trained_modules"
)
_RUN_COLUMNS = f"{_RUN_FIELDS}, steps, restore_path, restore_with_optimizer, restore_step, pending_gradients, closed"
_CHECKPOINT_COLUMNS = "model_id, checkpoint_type, name, created_at, size_bytes, expires_at, public, user_metadata, step"


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"store schema v{version} is newer than this server (v{len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # -- training runs ---------------------------------------------------------------

    def add_run(self, run: TrainingRun) -> None:
        lora = run.lora
        self._db.execute(
            f"INSERT INTO training_runs ({_RUN_FIELDS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.model_id,
                run.owner,
                run.base_model,
                lora.rank,
                lora.seed,
                lora.train_mlp,
                lora.train_attn,
                lora.train_unembed,
                lora.alpha,
                json.dumps(run.user_metadata),
                run.created_at,
                run.last_request_time,
                run.session_id,
                run.project_id,
                run.optimizer,
                json.dumps(run.trained_modules),
            ),
        )

    def remove_run(self, model_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM checkpoints WHERE model_id = ?", (model_id,))
            self._db.execute("DELETE FROM training_runs WHERE model_id = ?", (model_id,))
            self._db.execute("DELETE FROM queue_seqs WHERE queue_key = ?", (model_id,))
            self._db.execute("DELETE FROM step_metrics WHERE model_id = ?", (model_id,))

    def run(self, model_id: str) -> TrainingRun | None:
        row = self._db.execute(f"SELECT {_RUN_COLUMNS} FROM training_runs WHERE model_id = ?", (model_id,)).fetchone()
        return None if row is None else _run_from_row(row)

    def runs(
        self, owner: str | None, limit: int, offset: int, with_published: bool = False, project_id: str = ""
    ) -> tuple[list[TrainingRun], int]:
        """`owner`'s runs (None: every owner's), newest first; `with_published` adds other runs with a
        public checkpoint."""
        conditions: list[str] = []
        arguments: tuple = ()
        if owner is not None:
            published = " OR model_id IN (SELECT model_id FROM checkpoints WHERE public = 1)" if with_published else ""
            conditions.append(f"(owner = ?{published})")
            arguments += (owner,)
        if project_id:
            conditions.append("project_id = ?")
            arguments += (project_id,)
        where = " AND ".join(conditions) or "1"
        rows = self._db.execute(
            f"SELECT {_RUN_COLUMNS} FROM training_runs WHERE {where}"
            " ORDER BY created_at DESC, model_id LIMIT ? OFFSET ?",
            (*arguments, limit, offset),
        ).fetchall()
        total = self._db.execute(f"SELECT COUNT(*) FROM training_runs WHERE {where}", arguments).fetchone()[0]
        return [_run_from_row(row) for row in rows], total

    def session_runs(self, session_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT model_id FROM training_runs WHERE session_id = ? ORDER BY created_at, model_id", (session_id,)
        )
        return [row[0] for row in rows]

    def set_lora(self, model_id: str, lora: LoraSpec, trained_modules: list[str]) -> None:
        self._db.execute(
            "UPDATE training_runs SET lora_rank = ?, lora_seed = ?, train_mlp = ?, train_attn = ?, train_unembed = ?,"
            " lora_alpha = ?, trained_modules = ? WHERE model_id = ?",
            (
                lora.rank,
                lora.seed,
                lora.train_mlp,
                lora.train_attn,
                lora.train_unembed,
                lora.alpha,
                json.dumps(trained_modules),
                model_id,
            ),
        )

    def touch_run(self, model_id: str, when: float, steps_applied: int = 0, gradients: bool | None = None) -> int:
        """A request of the run succeeded: it applied `steps_applied` optimizer steps, and left it
        holding gradients or not (None: as before). Returns its optimizer steps so far."""
        rows = self._db.execute(  # fetchall ends the statement, so the write commits at once
            "UPDATE training_runs SET last_request_time = ?, steps = steps + ?,"
            " pending_gradients = coalesce(?, pending_gradients) WHERE model_id = ? RETURNING steps",
            (when, steps_applied, gradients, model_id),
        ).fetchall()
        return rows[0][0] if rows else 0

    def set_restore_point(self, model_id: str, point: RestorePoint) -> None:
        """The run's state is now `point`'s (saved as, or loaded from it)."""
        self._db.execute(
            "UPDATE training_runs SET restore_path = ?, restore_with_optimizer = ?, restore_step = ?, steps = ?"
            " WHERE model_id = ?",
            (point.path, point.with_optimizer, point.step, point.step, model_id),
        )

    def placement(self, model_id: str) -> Placement:
        row = self._db.execute(
            "SELECT replica, placement_epoch FROM training_runs WHERE model_id = ?", (model_id,)
        ).fetchone()
        return Placement(*row) if row is not None else Placement()

    def set_placement(self, model_id: str, placement: Placement) -> None:
        self._db.execute(
            "UPDATE training_runs SET replica = ?, placement_epoch = ? WHERE model_id = ?",
            (placement.replica, placement.epoch, model_id),
        )

    def close_run(self, model_id: str) -> None:
        self._db.execute("UPDATE training_runs SET closed = 1 WHERE model_id = ?", (model_id,))

    # -- step metrics (the console's curves) -----------------------------------------

    def add_gradients(self, model_id: str, step: int, loss_sum: float, loss_weight: float, tokens: int) -> None:
        """A forward_backward's share of `step` (passes accumulating one step's gradients add up)."""
        self._db.execute(
            "INSERT INTO step_metrics (model_id, step, recorded_at, loss_sum, loss_weight, tokens)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model_id, step) DO UPDATE SET recorded_at = excluded.recorded_at,"
            " loss_sum = loss_sum + excluded.loss_sum, loss_weight = loss_weight + excluded.loss_weight,"
            " tokens = tokens + excluded.tokens",
            (model_id, step, time.time(), loss_sum, loss_weight, tokens),
        )

    def add_optimizer_step(
        self, model_id: str, step: int, learning_rate: float, grad_norm: float | None, keep: int
    ) -> None:
        """The optim_step that applied `step`; only the newest `keep` steps of a run are kept."""
        with self._transaction():
            self._db.execute(
                "UPDATE step_metrics SET learning_rate = ?, grad_norm = ? WHERE model_id = ? AND step = ?",
                (learning_rate, grad_norm, model_id, step),
            )
            self._db.execute("DELETE FROM step_metrics WHERE model_id = ? AND step <= ?", (model_id, step - keep))

    def forget_steps_from(self, model_id: str, step: int) -> None:
        """The run went back to `step` (a load or a crash): the steps it took after are undone."""
        self._db.execute("DELETE FROM step_metrics WHERE model_id = ? AND step >= ?", (model_id, step))

    def step_metrics(self, model_id: str) -> list[StepMetrics]:
        rows = self._db.execute(
            "SELECT step, recorded_at, loss_sum, loss_weight, tokens, learning_rate, grad_norm FROM step_metrics"
            " WHERE model_id = ? ORDER BY step",
            (model_id,),
        ).fetchall()
        return [StepMetrics(*row) for row in rows]

    # -- checkpoints -----------------------------------------------------------------

    def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        path = checkpoint.path
        self._db.execute(
            f"INSERT OR REPLACE INTO checkpoints ({_CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                path.model_id,
                path.checkpoint_type,
                path.name,
                checkpoint.created_at,
                checkpoint.size_bytes,
                checkpoint.expires_at,
                checkpoint.public,
                json.dumps(checkpoint.user_metadata),
                checkpoint.step,
            ),
        )

    def checkpoint(self, path: CheckpointPath) -> Checkpoint | None:
        row = self._db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE model_id = ? AND checkpoint_type = ? AND name = ?",
            (path.model_id, path.checkpoint_type, path.name),
        ).fetchone()
        return None if row is None else _checkpoint_from_row(row)

    def checkpoints(self, model_id: str) -> list[Checkpoint]:
        rows = self._db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE model_id = ?"
            " ORDER BY created_at, checkpoint_type, name",
            (model_id,),
        ).fetchall()
        return [_checkpoint_from_row(row) for row in rows]

    def delete_checkpoint(self, path: CheckpointPath) -> None:
        self._db.execute(
            "DELETE FROM checkpoints WHERE model_id = ? AND checkpoint_type = ? AND name = ?",
            (path.model_id, path.checkpoint_type, path.name),
        )

    def owner_checkpoint_bytes(self, owner: str) -> int:
        return self._db.execute(
            "SELECT coalesce(sum(c.size_bytes), 0) FROM checkpoints c JOIN training_runs r ON r.model_id = c.model_id"
            " WHERE r.owner = ?",
            (owner,),
        ).fetchone()[0]

    def owner_checkpoints(self, owner: str, limit: int, offset: int) -> tuple[list[Checkpoint], int]:
        """Every checkpoint of `owner`'s runs, newest first."""
        columns = ", ".join(f"c.{column.strip()}" for column in _CHECKPOINT_COLUMNS.split(","))
        joined = "checkpoints c JOIN training_runs r ON r.model_id = c.model_id WHERE r.owner = ?"
        rows = self._db.execute(
            f"SELECT {columns} FROM {joined} ORDER BY c.created_at DESC, c.model_id, c.name LIMIT ? OFFSET ?",
            (owner, limit, offset),
        ).fetchall()
        total = self._db.execute(f"SELECT COUNT(*) FROM {joined}", (owner,)).fetchone()[0]
        return [_checkpoint_from_row(row) for row in rows], total

    def set_checkpoint_public(self, path: CheckpointPath, public: bool) -> None:
        self._db.execute(
            "UPDATE checkpoints SET public = ? WHERE model_id = ? AND checkpoint_type = ? AND name = ?",
            (public, path.model_id, path.checkpoint_type, path.name),
        )

    def set_checkpoint_expiry(self, path: CheckpointPath, expires_at: float | None) -> None:
        self._db.execute(
            "UPDATE checkpoints SET expires_at = ? WHERE model_id = ? AND checkpoint_type = ? AND name = ?",
            (expires_at, path.model_id, path.checkpoint_type, path.name),
        )

    def expired_checkpoints(self, now: float) -> list[Checkpoint]:
        rows = self._db.execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints WHERE expires_at <= ?", (now,)
        ).fetchall()
        return [_checkpoint_from_row(row) for row in rows]

    # -- futures' results ------------------------------------------------------------

    def accept(self, future_id: str, owner: str, idempotency_key: str, queue_key: str) -> int:
        """Records an accepted request before it is acked; returns its seq, the next of its queue's
        (counted across restarts, and only for clients' requests)."""
        with self._transaction():
            (seq,) = self._db.execute(
                "INSERT INTO queue_seqs VALUES (?, 1) ON CONFLICT (queue_key) DO UPDATE SET seq = seq + 1"
                " RETURNING seq",
                (queue_key,),
            ).fetchone()
            self._db.execute(
                "INSERT INTO accepted_requests VALUES (?, ?, ?, ?)",
                (future_id, owner, idempotency_key, seq),
            )
        return seq

    def accepted(self, owner: str, idempotency_key: str) -> tuple[str, int] | None:
        """(future_id, seq) of the request `owner` sent with this idempotency key, while it is kept."""
        row = self._db.execute(
            # "!= ''" as the partial unique index has it: without it SQLite scans the whole table.
            "SELECT future_id, seq FROM accepted_requests"
            " WHERE owner = ? AND idempotency_key = ? AND idempotency_key != ''",
            (owner, idempotency_key),
        ).fetchone()
        return None if row is None else (row[0], row[1])

    def unanswered(self) -> list[tuple[str, str]]:
        """(future_id, owner) of accepted requests that have no result: a crash cut them short."""
        return self._db.execute(
            "SELECT a.future_id, a.owner FROM accepted_requests a"
            " LEFT JOIN future_results r ON r.future_id = a.future_id WHERE r.future_id IS NULL"
        ).fetchall()

    def forget_queues(self, prefix: str) -> None:
        """Forgets the seq counters of queues whose key starts with `prefix` (their weights are gone)."""
        self._db.execute("DELETE FROM queue_seqs WHERE substr(queue_key, 1, ?) = ?", (len(prefix), prefix))

    def put_result(self, future_id: str, owner: str, result: bytes, expires_at: float) -> None:
        """The request's result; its record (and idempotency key) is kept as long (purge_results)."""
        self._db.execute(
            "INSERT OR REPLACE INTO future_results VALUES (?, ?, ?, ?)", (future_id, owner, result, expires_at)
        )

    def result(self, future_id: str) -> tuple[str, bytes, float] | None:
        """(owner, serialized Result, expires_at), or None if never stored or already purged."""
        row = self._db.execute(
            "SELECT owner, result, expires_at FROM future_results WHERE future_id = ?", (future_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def purge_results(self, now: float) -> Counter[str]:
        """Forgets expired results, and the requests they answered (one still unanswered stays);
        how many went, by owner."""
        with self._transaction():
            self._db.execute(
                "DELETE FROM accepted_requests WHERE future_id IN"
                " (SELECT future_id FROM future_results WHERE expires_at <= ?)",
                (now,),
            )
            rows = self._db.execute("DELETE FROM future_results WHERE expires_at <= ? RETURNING owner", (now,))
            return Counter(owner for (owner,) in rows.fetchall())

    def result_counts(self) -> Counter[str]:
        """Results kept, by owner."""
        rows = self._db.execute("SELECT owner, count(*) FROM future_results GROUP BY owner").fetchall()
        return Counter(dict(rows))

    # -- client sessions and samplers ------------------------------------------------

    def add_session(self, session: Session) -> None:
        self._db.execute(
            "INSERT INTO sessions (session_id, owner, created_at, project_id, display_name, user_metadata)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                session.session_id,
                session.owner,
                session.created_at,
                session.project_id,
                session.display_name,
                json.dumps(session.user_metadata),
            ),
        )

    def session(self, session_id: str) -> Session | None:
        row = self._db.execute(
            "SELECT session_id, owner, created_at, project_id, display_name, user_metadata, status, detail"
            " FROM sessions WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        if row is None:
            return None
        *fields, metadata, status, detail = row
        return Session(*fields, json.loads(metadata), status, detail)

    def sessions(self, owner: str, limit: int, offset: int) -> tuple[list[str], int]:
        rows = self._db.execute(
            "SELECT session_id FROM sessions WHERE owner = ? ORDER BY created_at DESC, session_id LIMIT ? OFFSET ?",
            (owner, limit, offset),
        ).fetchall()
        total = self._db.execute("SELECT COUNT(*) FROM sessions WHERE owner = ?", (owner,)).fetchone()[0]
        return [row[0] for row in rows], total

    def close_session(self, session_id: str, status: str, detail: str) -> None:
        self._db.execute(
            "UPDATE sessions SET status = ?, detail = ? WHERE session_id = ?", (status, detail, session_id)
        )

    def assign_session_project(self, session_id: str, project_id: str) -> None:
        """The session and the runs it created move to `project_id`."""
        with self._transaction():
            self._db.execute("UPDATE sessions SET project_id = ? WHERE session_id = ?", (project_id, session_id))
            self._db.execute("UPDATE training_runs SET project_id = ? WHERE session_id = ?", (project_id, session_id))

    def add_sampler(self, sampler: Sampler) -> None:
        self._db.execute(
            "INSERT INTO samplers (sampler_id, owner, session_id, base_model, model_path, record_stability_info,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            dataclasses.astuple(sampler),
        )

    def delete_samplers(self, model_path: str) -> None:
        self._db.execute("DELETE FROM samplers WHERE model_path = ?", (model_path,))

    def sampler(self, sampler_id: str) -> Sampler | None:
        row = self._db.execute(
            "SELECT sampler_id, owner, session_id, base_model, model_path, record_stability_info, created_at"
            " FROM samplers WHERE sampler_id = ?",
            (sampler_id,),
        ).fetchone()
        return None if row is None else _sampler_from_row(row)

    def run_samplers(self, model_id: str) -> list[Sampler]:
        """The samplers of weights the run saved (or of its live weights), oldest first."""
        prefix = f"{TINKER_SCHEME}{model_id}/"
        rows = self._db.execute(
            "SELECT sampler_id, owner, session_id, base_model, model_path, record_stability_info, created_at"
            " FROM samplers WHERE substr(model_path, 1, ?) = ? ORDER BY created_at, sampler_id",
            (len(prefix), prefix),
        ).fetchall()
        return [_sampler_from_row(row) for row in rows]

    def session_samplers(self, session_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT sampler_id FROM samplers WHERE session_id = ? ORDER BY created_at, sampler_id", (session_id,)
        )
        return [row[0] for row in rows]

    # -- sampled sequences (recorded for provenance) ---------------------------------

    def put_sampled_sequences(self, owner: str, sequences: list[RecordedSequence], now: float) -> None:
        rows = [
            (
                sequence.sequence_id,
                owner,
                sequence.prompt.astype("<i4").tobytes(),
                sequence.tokens.astype("<i4").tobytes(),
                sequence.logprobs.astype("<f4").tobytes(),
                now,
            )
            for sequence in sequences
        ]
        with self._transaction():
            self._db.executemany(
                "INSERT INTO sampled_sequences (sequence_id, owner, prompt, tokens, logprobs, last_used) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def sampled_sequence(self, sequence_id: str, owner: str, used_since: float) -> RecordedSequence | None:
        """The owner's sequence if it was last used after `used_since`; None for another owner's."""
        row = self._db.execute(
            "SELECT prompt, tokens, logprobs FROM sampled_sequences "
            "WHERE sequence_id = ? AND owner = ? AND last_used > ?",
            (sequence_id, owner, used_since),
        ).fetchone()
        if row is None:
            return None
        prompt, tokens, logprobs = row
        return RecordedSequence(
            sequence_id, np.frombuffer(prompt, "<i4"), np.frombuffer(tokens, "<i4"), np.frombuffer(logprobs, "<f4")
        )

    def touch_sampled_sequences(self, sequence_ids: Iterable[str], now: float) -> None:
        with self._transaction():
            self._db.executemany(
                "UPDATE sampled_sequences SET last_used = ? WHERE sequence_id = ?",
                [(now, sequence_id) for sequence_id in sequence_ids],
            )

    def purge_sampled_sequences(self, used_before: float, now: float) -> int:
        """Expires records unused since `used_before`, remembering their ids (so a later use is told
        they expired, not that they never were) until `used_before` passes their expiry too."""
        expired = "SELECT sequence_id, owner, ? FROM sampled_sequences WHERE last_used <= ?"
        return self._expire(expired, (now, used_before), "last_used <= ?", (used_before,))

    def cap_sampled_sequences(self, owner: str, keep: int, now: float) -> int:
        """Expires the owner's least recently used records beyond the newest `keep`."""
        beyond = "SELECT sequence_id FROM sampled_sequences WHERE owner = ? ORDER BY last_used DESC LIMIT -1 OFFSET ?"
        expired = f"SELECT sequence_id, owner, ? FROM sampled_sequences WHERE sequence_id IN ({beyond})"
        return self._expire(expired, (now, owner, keep), f"sequence_id IN ({beyond})", (owner, keep))

    def _expire(self, select: str, select_arguments: tuple, where: str, where_arguments: tuple) -> int:
        with self._transaction():
            self._db.execute(f"INSERT OR REPLACE INTO expired_sequences {select}", select_arguments)
            return self._db.execute(f"DELETE FROM sampled_sequences WHERE {where}", where_arguments).rowcount

    def sequence_expired(self, sequence_id: str, owner: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM expired_sequences WHERE sequence_id = ? AND owner = ?", (sequence_id, owner)
        ).fetchone()
        return row is not None

    def purge_expired_sequence_ids(self, expired_before: float) -> int:
        return self._db.execute("DELETE FROM expired_sequences WHERE expired_at <= ?", (expired_before,)).rowcount


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step of a run saw: the forward_backward passes that made its gradients
    (summed), and the optim_step that applied them (None until it ran)."""

    step: int
    recorded_at: float
    loss_sum: float
    loss_weight: float
    """The tokens the loss counted, weighted (cross_entropy's weights, else 1 per target token)."""
    tokens: int
    """Input tokens through the model."""
    learning_rate: float | None = None
    grad_norm: float | None = None

    @property
    def loss_per_token(self) -> float | None:
        return self.loss_sum / self.loss_weight if self.loss_weight else None


@dataclass(frozen=True)
class RecordedSequence:
    """A sampled sequence as the sampler saw it: prompt and sampled tokens, and the sampling
    model's own logprob of each sampled token."""

    sequence_id: str
    prompt: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray


def _run_from_row(row: tuple) -> TrainingRun:
    (model_id, owner, base_model, rank, seed, mlp, attn, unembed, alpha, metadata, created, last, *rest) = row
    session_id, project_id, optimizer, trained_modules, steps, restore_path, with_optimizer, restore_step = rest[:8]
    pending_gradients, closed = rest[8:]
    return TrainingRun(
        model_id,
        owner,
        base_model,
        LoraSpec(rank, seed, bool(mlp), bool(attn), bool(unembed), alpha),
        json.loads(metadata),
        created,
        last,
        session_id,
        project_id,
        optimizer,
        json.loads(trained_modules),
        steps,
        RestorePoint(restore_path, bool(with_optimizer), restore_step),
        bool(pending_gradients),
        bool(closed),
    )


def _sampler_from_row(row: tuple) -> Sampler:
    return Sampler(*row[:5], bool(row[5]), row[6])


def _checkpoint_from_row(row: tuple) -> Checkpoint:
    model_id, checkpoint_type, name, created_at, size_bytes, expires_at, public, metadata, step = row
    path = CheckpointPath(model_id, checkpoint_type, name)
    return Checkpoint(path, created_at, size_bytes, expires_at, bool(public), json.loads(metadata), step)
