"""The SQLite store: versioned migrations, checkpoint paths, expiry queries."""

from __future__ import annotations

import sqlite3

import pytest

from tinker_server.ops import LoraSpec
from tinker_server.store import MIGRATIONS, Checkpoint, CheckpointPath, Store, TrainingRun

LORA = LoraSpec(rank=4, seed=1, train_mlp=True, train_attn=True, train_unembed=False, alpha=32.0)


def test_a_new_store_is_at_the_latest_schema_and_reopening_keeps_the_data(tmp_path):
    store = Store(tmp_path / "db")
    assert store.schema_version == len(MIGRATIONS)
    store.add_run(TrainingRun("run-a", "", "base", LORA, {"k": "v"}, created_at=1.0, last_request_time=2.0))
    store.put_checkpoint(Checkpoint(CheckpointPath("run-a", "training", "c"), 3.0, 10, expires_at=5.0))
    store.close()
    reopened = Store(tmp_path / "db")
    assert reopened.run("run-a").lora == LORA and reopened.run("run-a").user_metadata == {"k": "v"}
    assert [c.path.name for c in reopened.expired_checkpoints(now=6.0)] == ["c"]
    assert reopened.expired_checkpoints(now=4.0) == []


def test_a_store_from_a_newer_server_is_refused(tmp_path):
    Store(tmp_path / "db").close()
    with sqlite3.connect(tmp_path / "db") as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this server"):
        Store(tmp_path / "db")


@pytest.mark.parametrize(
    "text",
    [
        "tinker://r/weights",
        "tinker://r/weights/a/b",
        "tinker:///weights/a",
        "tinker://r/other/a",
        "s3://r/weights/a",
        "tinker://../weights/a",
        "tinker://r/weights/..",
        "tinker://r/weights/.hidden",
    ],
)
def test_malformed_checkpoint_paths_are_rejected(text):
    with pytest.raises(ValueError, match="not a checkpoint path"):
        CheckpointPath.parse(text)


def test_checkpoint_paths_round_trip():
    path = CheckpointPath.parse("tinker://run-1/sampler_weights/s")
    assert (path.model_id, path.checkpoint_type, path.name) == ("run-1", "sampler", "s")
    assert path.checkpoint_id == "sampler_weights/s" and str(path) == "tinker://run-1/sampler_weights/s"
