"""The durable record of the server: training runs, checkpoints and completed futures' results.

SQLite in --data-dir (WAL mode), schema versioned with `PRAGMA user_version`; checkpoint
files live beside it under runs/<model_id>/. One connection, used from the event loop
thread only: every statement here is a short, indexed lookup or write.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tinker_server.ops import LoraSpec

CheckpointType = Literal["training", "sampler"]
TINKER_SCHEME = "tinker://"
_PATH_SEGMENTS: dict[str, CheckpointType] = {"weights": "training", "sampler_weights": "sampler"}
_SEGMENT_OF = {kind: segment for segment, kind in _PATH_SEGMENTS.items()}
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")

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
]


@dataclass(frozen=True)
class CheckpointPath:
    """tinker://<model_id>/<weights|sampler_weights>/<name>"""

    model_id: str
    checkpoint_type: CheckpointType
    name: str

    @classmethod
    def parse(cls, path: str) -> CheckpointPath:
        """Raises ValueError with the expected form."""
        parts = path.removeprefix(TINKER_SCHEME).split("/") if path.startswith(TINKER_SCHEME) else []
        # Both ends become directory names: never '..', separators or anything odd.
        if len(parts) != 3 or parts[1] not in _PATH_SEGMENTS or not all(map(_SAFE_SEGMENT.match, parts[::2])):
            raise ValueError(
                f"{path!r} is not a checkpoint path; expected tinker://<run>/weights/<name> "
                "or tinker://<run>/sampler_weights/<name>"
            )
        return cls(parts[0], _PATH_SEGMENTS[parts[1]], parts[2])

    @property
    def checkpoint_id(self) -> str:
        return f"{_SEGMENT_OF[self.checkpoint_type]}/{self.name}"

    def __str__(self) -> str:
        return f"{TINKER_SCHEME}{self.model_id}/{self.checkpoint_id}"

    def directory(self, data_dir: Path) -> Path:
        return data_dir / "runs" / self.model_id / _SEGMENT_OF[self.checkpoint_type] / self.name


@dataclass
class TrainingRun:
    model_id: str
    owner: str
    base_model: str
    lora: LoraSpec
    user_metadata: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    last_request_time: float = field(default_factory=time.time)


@dataclass
class Checkpoint:
    path: CheckpointPath
    created_at: float
    size_bytes: int
    expires_at: float | None


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
            "INSERT INTO training_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def remove_run(self, model_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM checkpoints WHERE model_id = ?", (model_id,))
            self._db.execute("DELETE FROM training_runs WHERE model_id = ?", (model_id,))

    def run(self, model_id: str) -> TrainingRun | None:
        row = self._db.execute("SELECT * FROM training_runs WHERE model_id = ?", (model_id,)).fetchone()
        return None if row is None else _run_from_row(row)

    def runs(self, owner: str, limit: int, offset: int) -> tuple[list[TrainingRun], int]:
        rows = self._db.execute(
            "SELECT * FROM training_runs WHERE owner = ? ORDER BY created_at DESC, model_id LIMIT ? OFFSET ?",
            (owner, limit, offset),
        ).fetchall()
        total = self._db.execute("SELECT COUNT(*) FROM training_runs WHERE owner = ?", (owner,)).fetchone()[0]
        return [_run_from_row(row) for row in rows], total

    def set_lora(self, model_id: str, lora: LoraSpec) -> None:
        self._db.execute(
            "UPDATE training_runs SET lora_rank = ?, lora_seed = ?, train_mlp = ?, train_attn = ?, train_unembed = ?,"
            " lora_alpha = ? WHERE model_id = ?",
            (lora.rank, lora.seed, lora.train_mlp, lora.train_attn, lora.train_unembed, lora.alpha, model_id),
        )

    def touch_run(self, model_id: str, when: float) -> None:
        self._db.execute("UPDATE training_runs SET last_request_time = ? WHERE model_id = ?", (when, model_id))

    # -- checkpoints -----------------------------------------------------------------

    def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        path = checkpoint.path
        self._db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
            (
                path.model_id,
                path.checkpoint_type,
                path.name,
                checkpoint.created_at,
                checkpoint.size_bytes,
                checkpoint.expires_at,
            ),
        )

    def checkpoint(self, path: CheckpointPath) -> Checkpoint | None:
        row = self._db.execute(
            "SELECT * FROM checkpoints WHERE model_id = ? AND checkpoint_type = ? AND name = ?",
            (path.model_id, path.checkpoint_type, path.name),
        ).fetchone()
        return None if row is None else _checkpoint_from_row(row)

    def checkpoints(self, model_id: str) -> list[Checkpoint]:
        rows = self._db.execute(
            "SELECT * FROM checkpoints WHERE model_id = ? ORDER BY created_at, checkpoint_type, name", (model_id,)
        ).fetchall()
        return [_checkpoint_from_row(row) for row in rows]

    def delete_checkpoint(self, path: CheckpointPath) -> None:
        self._db.execute(
            "DELETE FROM checkpoints WHERE model_id = ? AND checkpoint_type = ? AND name = ?",
            (path.model_id, path.checkpoint_type, path.name),
        )

    def expired_checkpoints(self, now: float) -> list[Checkpoint]:
        rows = self._db.execute("SELECT * FROM checkpoints WHERE expires_at <= ?", (now,)).fetchall()
        return [_checkpoint_from_row(row) for row in rows]

    # -- futures' results ------------------------------------------------------------

    def put_result(self, future_id: str, owner: str, result: bytes, expires_at: float) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO future_results VALUES (?, ?, ?, ?)", (future_id, owner, result, expires_at)
        )

    def result(self, future_id: str) -> tuple[str, bytes, float] | None:
        """(owner, serialized Result, expires_at), or None if never stored or already purged."""
        row = self._db.execute(
            "SELECT owner, result, expires_at FROM future_results WHERE future_id = ?", (future_id,)
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def purge_results(self, now: float) -> int:
        return self._db.execute("DELETE FROM future_results WHERE expires_at <= ?", (now,)).rowcount


def _run_from_row(row: tuple) -> TrainingRun:
    (model_id, owner, base_model, rank, seed, mlp, attn, unembed, alpha, metadata, created, last) = row
    lora = LoraSpec(rank, seed, bool(mlp), bool(attn), bool(unembed), alpha)
    return TrainingRun(model_id, owner, base_model, lora, json.loads(metadata), created, last)


def _checkpoint_from_row(row: tuple) -> Checkpoint:
    model_id, checkpoint_type, name, created_at, size_bytes, expires_at = row
    return Checkpoint(CheckpointPath(model_id, checkpoint_type, name), created_at, size_bytes, expires_at)
