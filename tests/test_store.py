"""The SQLite store: versioned migrations, checkpoint paths, expiry queries."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time

import numpy as np
import pytest

from tinker_rpc.v1 import service_pb2
from tinker_server import ops
from tinker_server.api.dispatch import Dispatcher
from tinker_server.api.provenance import SEQUENCE_TTL_SECONDS
from tinker_server.api.requests import Limits, ParsedRequest
from tinker_server.ops import LoraSpec
from tinker_server.runs import Runs
from tinker_server.store import (
    MIGRATIONS,
    Checkpoint,
    CheckpointPath,
    RecordedSequence,
    RestorePoint,
    Store,
    TrainingRun,
)

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


def recorded(sequence_id: str) -> RecordedSequence:
    return RecordedSequence(
        sequence_id, np.array([1, 2, 3], np.int64), np.array([4, 5], np.int32), np.array([-0.5, -1.5], np.float32)
    )


def test_sampled_sequences_belong_to_their_owner_and_expire_a_day_after_their_last_use(tmp_path):
    store = Store(tmp_path / "db")
    day = SEQUENCE_TTL_SECONDS
    store.put_sampled_sequences("alice", [recorded("seq-a"), recorded("seq-b")], now=100.0)
    found = store.sampled_sequence("seq-a", "alice", used_since=100.0 - day)
    assert found.prompt.tolist() == [1, 2, 3] and found.tokens.tolist() == [4, 5]
    assert found.logprobs.tolist() == [-0.5, -1.5]
    assert store.sampled_sequence("seq-a", "bob", used_since=0.0) is None
    assert store.sampled_sequence("seq-a", "alice", used_since=100.0) is None  # not used since

    store.touch_sampled_sequences(["seq-b"], now=200.0)
    assert store.sampled_sequence("seq-b", "alice", used_since=150.0) is not None

    runs = Runs(store, tmp_path)
    store.put_sampled_sequences("alice", [recorded("seq-now")], now=time.time())
    store.touch_sampled_sequences(["seq-b"], now=time.time() - day + 60)  # used 23h59m ago
    asyncio.run(Dispatcher(None, runs, Limits(), result_retention_seconds=60.0).sweep())
    kept = [
        sequence_id
        for sequence_id in ("seq-a", "seq-b", "seq-now")
        if store.sampled_sequence(sequence_id, "alice", 0.0)
    ]
    assert kept == ["seq-b", "seq-now"]
    assert store.sequence_expired("seq-a", "alice") and not store.sequence_expired("seq-a", "bob")


def test_an_owners_records_beyond_the_limit_expire_least_recently_used_first(tmp_path):
    store = Store(tmp_path / "db")
    for index in range(5):
        store.put_sampled_sequences("alice", [recorded(f"seq-{index}")], now=float(index))
    store.put_sampled_sequences("bob", [recorded("seq-bob")], now=0.0)
    store.touch_sampled_sequences(["seq-0"], now=10.0)  # used again: now the newest
    assert store.cap_sampled_sequences("alice", keep=3, now=20.0) == 2
    kept = [f"seq-{index}" for index in range(5) if store.sampled_sequence(f"seq-{index}", "alice", -1.0)]
    assert kept == ["seq-0", "seq-3", "seq-4"]
    assert store.sequence_expired("seq-1", "alice") and store.sampled_sequence("seq-bob", "bob", -1.0)


def test_seq_counts_per_queue_across_reopening_and_keys_are_remembered_until_their_result_expires(tmp_path):
    store = Store(tmp_path / "db")
    seqs = [store.accept(f"f{i}", "alice", f"k{i}", queue) for i, queue in enumerate("abaab")]
    assert seqs == [1, 1, 2, 3, 2]
    store.close()
    store = Store(tmp_path / "db")
    assert store.accept("f5", "alice", "", "a") == 4  # no restart resets it
    assert store.accepted("alice", "k2") == ("f2", 2) and store.accepted("bob", "k2") is None
    assert sorted(future_id for future_id, _ in store.unanswered()) == ["f0", "f1", "f2", "f3", "f4", "f5"]

    store.put_result("f2", "alice", b"done", expires_at=20.0)
    store.purge_results(now=15.0)  # an unanswered request stays; an answered one with its result
    assert store.accepted("alice", "k2") == ("f2", 2) and store.accepted("alice", "k0") == ("f0", 1)
    store.purge_results(now=25.0)
    assert store.accepted("alice", "k2") is None and store.result("f2") is None
    assert "f2" not in {future_id for future_id, _ in store.unanswered()}

    store.forget_queues("b")
    assert store.accept("f6", "alice", "", "b") == 1


def test_requests_a_crash_cut_short_are_answered_with_an_error_saying_so(tmp_path):
    async def after_restart() -> tuple[str, service_pb2.Result]:
        store = Store(tmp_path / "db")
        store.accept("lost", "alice", "key", "run-a")
        dispatcher = Dispatcher(None, Runs(store, tmp_path), Limits(), 60.0)
        dispatcher.answer_lost_requests()
        return dispatcher.previous("alice", "key"), await dispatcher.result_of("lost", "alice")

    previous, result = asyncio.run(after_restart())
    assert previous == ("lost", 1)  # a resend is answered with the original ack, never run again
    assert result.error.code == 10 and "before this request finished" in result.error.message


def _record(dispatcher: Dispatcher, operation: ops.Operation, result: ops.OpResult) -> None:
    """The dispatcher records a successful request of run-a as when the worker answered it."""
    parsed = ParsedRequest("run-a", ops.WorkItem("f", "run-a", operation))
    dispatcher._record(parsed, ops.Outcome("f", 1, result), "")


def _forward_backward(lengths: list[int], weights: list[float] | None, loss_sum: float) -> tuple:
    data = [
        ops.DatumArrays(
            np.arange(length, dtype=np.int64),
            {"target_tokens": np.arange(length, dtype=np.int64)}
            | ({} if weights is None else {"weights": np.full(length, weights[index], np.float32)}),
        )
        for index, length in enumerate(lengths)
    ]
    loss_fn = "cross_entropy" if weights is not None else "importance_sampling"
    return ops.ForwardBackward(data, loss_fn, {}, backward=True), ops.ForwardBackwardResult([], {"loss:sum": loss_sum})


def _optim_step(learning_rate: float, grad_norm: float) -> tuple:
    adam = ops.AdamConfig(learning_rate, 0.9, 0.95, 1e-8, 0.0, 0.0)
    return ops.OptimStep(adam), ops.OptimStepResult({"grad_norm": grad_norm, "learning_rate": learning_rate})


def test_each_step_records_loss_per_weighted_token_tokens_learning_rate_and_grad_norm(tmp_path):
    store = Store(tmp_path / "db")
    store.add_run(TrainingRun("run-a", "", "base", LORA))
    dispatcher = Dispatcher(None, Runs(store, tmp_path), Limits(), 60.0)
    # Step 0: two passes accumulate (weights 0.5 over 4 tokens, 1.0 over 6), then the optimizer step.
    _record(dispatcher, *_forward_backward([4], [0.5], loss_sum=3.0))
    _record(dispatcher, *_forward_backward([6], [1.0], loss_sum=9.0))
    _record(dispatcher, *_optim_step(1e-3, 2.5))
    # Step 1: a loss without weights counts each target token once; a forward-only pass adds nothing.
    _record(dispatcher, *_forward_backward([5, 3], None, loss_sum=4.0))
    forward, result = _forward_backward([7], None, loss_sum=100.0)
    _record(dispatcher, dataclasses.replace(forward, backward=False), result)

    first, second = store.step_metrics("run-a")
    assert (first.step, first.loss_per_token, first.tokens) == (0, 12.0 / (0.5 * 4 + 6), 10)
    assert (first.learning_rate, first.grad_norm) == (1e-3, 2.5)
    assert (second.step, second.loss_per_token, second.tokens) == (1, 4.0 / 8, 8)
    assert (second.learning_rate, second.grad_norm) == (None, None)  # its optim_step has not run


def test_a_run_keeps_only_its_newest_steps_and_a_load_forgets_the_steps_it_undid(tmp_path):
    store = Store(tmp_path / "db")
    store.add_run(TrainingRun("run-a", "", "base", LORA))
    dispatcher = Dispatcher(None, Runs(store, tmp_path), Limits(max_metric_steps_per_run=3), 60.0)
    for step in range(5):
        _record(dispatcher, *_forward_backward([2], [1.0], loss_sum=float(step)))
        _record(dispatcher, *_optim_step(1e-3, 1.0))
    assert [point.step for point in store.step_metrics("run-a")] == [2, 3, 4]

    load = ParsedRequest(
        "run-a", ops.WorkItem("f", "run-a", ops.LoadState(None, False)), restore=RestorePoint("", step=3)
    )
    dispatcher._record(load, ops.Outcome("f", 1, ops.LoadStateResult()), "")
    assert [point.step for point in store.step_metrics("run-a")] == [2]
    _record(dispatcher, *_forward_backward([2], [1.0], loss_sum=7.0))
    assert [(point.step, point.loss_per_token) for point in store.step_metrics("run-a")] == [(2, 2.0 / 2), (3, 7.0 / 2)]


def test_an_idempotency_lookup_searches_the_index_instead_of_scanning_every_kept_request(tmp_path):
    """Every request is looked up by its idempotency key before it is acked; a scan costs 1.2 ms with
    20000 requests kept (a long RL loop keeps hundreds of thousands within the retention)."""
    store = Store(tmp_path / "db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    assert store.accepted("alice", "k") is None
    store._db.set_trace_callback(None)
    (statement,) = statements
    plan = " ".join(row[-1] for row in store._db.execute(f"EXPLAIN QUERY PLAN {statement}"))
    assert "USING INDEX accepted_requests_key" in plan, plan
