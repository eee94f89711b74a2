"""Failures leave things as they were: a result that cannot be recorded still answers, a failed
load changes nothing, a checkpoint is on disk whole or not at all, a bad import is refused."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import grpc
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from tinker_client import BadRequestError, service_client
from tinker_server import ops
from tinker_server.api.dispatch import Dispatcher
from tinker_server.api.requests import Limits, ParsedRequest
from tinker_server.files import remove_staging_leftovers, write_whole
from tinker_server.runs import Runs
from tinker_server.scheduler import CyclePolicy, Scheduler
from tinker_server.store import CheckpointPath, Store, TrainingRun, is_safe_name
from tinker_server.worker.models import build_embedded_model

from .engine_helpers import batches, engine_with_adapters, forward_items

ADAM = ops.AdamConfig(1e-2, 0.9, 0.95, 1e-12, 0.0, 0.0)


# -- results -------------------------------------------------------------------------


class OneReplica:
    """What the dispatcher asks of a fleet, for one scheduler and no worker."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def choose(self, base_model: str) -> None:
        return None

    def place(self, model_id: str, slot: None) -> None:
        pass

    def submit(self, queue_key: str, item: ops.WorkItem, base_model: str = "", first: bool = False) -> object:
        return self._scheduler.submit(queue_key, item, first)


async def _settle_with_a_failing_store(tmp_path: Path) -> tuple[object, Dispatcher]:
    async def run_cycle(cycle: ops.Cycle) -> list[ops.Outcome]:
        return [ops.Outcome(item.future_id, cycle.cycle_id, result=ops.OptimStepResult({})) for item in cycle.items]

    store = Store(tmp_path / "tinker.db")

    def disk_full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.put_result = disk_full
    scheduler = Scheduler(run_cycle, CyclePolicy())
    clock = asyncio.create_task(scheduler.run())
    runs = Runs(store, tmp_path)
    runs.add_live(TrainingRun("run-a", "", "base", ops.LoraSpec(4, 0, True, True, True, 32.0)))
    dispatcher = Dispatcher(OneReplica(scheduler), runs, Limits(), 60.0)
    try:
        item = ops.WorkItem("", "run-a", ops.OptimStep(ADAM))
        submitted = dispatcher.submit(ParsedRequest("run-a", item), owner="")
        return await asyncio.wait_for(submitted.result, 10), dispatcher
    finally:
        clock.cancel()


def test_a_result_the_server_cannot_record_still_answers_the_client(tmp_path):
    result, dispatcher = asyncio.run(_settle_with_a_failing_store(tmp_path))
    assert result.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "could not record its result" in result.error.message and "disk is full" in result.error.message
    assert not dispatcher._inflight  # nothing left waiting


# -- checkpoints on disk -----------------------------------------------------------


def test_a_checkpoint_is_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "runs" / "run-a" / "weights" / "step-1"

    def torn(staging: Path) -> None:
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_whole(target, torn)
    assert not target.exists() and list(target.parent.iterdir()) == []

    write_whole(target, lambda staging: (staging / "a").write_text("first"))
    write_whole(target, lambda staging: (staging / "b").write_text("second"))  # an overwrite replaces it whole
    assert [file.name for file in target.iterdir()] == ["b"]
    assert [entry.name for entry in target.parent.iterdir()] == ["step-1"]

    leftover = target.parent / ".step-2.abc123"  # what a crash mid-write leaves
    leftover.mkdir()
    remove_staging_leftovers(tmp_path)
    assert not leftover.exists() and target.exists()


def test_names_with_a_trailing_newline_or_a_leading_dot_are_not_checkpoint_names():
    assert is_safe_name("step-1.final")
    assert not any(map(is_safe_name, ["step-1\n", ".hidden", "a/b", "..", "", "x" * 129]))
    with pytest.raises(ValueError):
        CheckpointPath.parse("tinker://run-a/weights/step-1\n")


# -- a failed load changes nothing -------------------------------------------------


def _trained_engine_and_state(tmp_path: Path):
    """An engine whose run "a" took a step, and a saved state of it whose AdamW moments have the wrong shape."""
    engine = engine_with_adapters(("a",))
    engine.run_cycle(ops.Cycle(1, forward_items({"a": batches()["a"]})))
    engine.run_cycle(ops.Cycle(2, [ops.WorkItem("s", "a", ops.OptimStep(ADAM))]))
    directory = tmp_path / "saved"
    save = ops.SaveState("tinker://a/weights/s", str(directory))
    (outcome,) = engine.run_cycle(ops.Cycle(3, [ops.WorkItem("w", "a", save)]))
    assert outcome.error is None, outcome.error
    state_file = str(directory / "optimizer.safetensors")
    state = load_file(state_file)
    save_file({key: value[..., :1].contiguous() if value.dim() else value for key, value in state.items()}, state_file)
    return engine, directory


def _snapshot(engine) -> dict[str, torch.Tensor]:
    adapter = engine.residency.run("a")
    tensors = {f"{path}.{m}": getattr(pair, m).detach().clone() for path, pair in adapter.pairs.items() for m in "AB"}
    for index, param in enumerate(adapter.parameters()):
        tensors.update({f"{index}.{k}": v.clone() for k, v in adapter.optimizer.state[param].items()})
    return tensors


def test_a_load_state_that_fails_leaves_the_run_as_it_was(tmp_path):
    engine, directory = _trained_engine_and_state(tmp_path)
    before = _snapshot(engine)
    (outcome,) = engine.run_cycle(ops.Cycle(4, [ops.WorkItem("l", "a", ops.LoadState(str(directory), True))]))
    assert outcome.error is not None and "optimizer.safetensors" in outcome.error.message
    after = _snapshot(engine)
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_a_run_created_from_a_broken_state_leaves_no_adapter_behind(tmp_path):
    engine, directory = _trained_engine_and_state(tmp_path)
    create = ops.CreateAdapter(ops.LoraSpec(4, 0, True, True, True, 32.0), str(directory), with_optimizer=True)
    (outcome,) = engine.run_cycle(ops.Cycle(4, [ops.WorkItem("c", "b", create)]))
    assert outcome.error is not None
    assert "b" not in engine.residency.entries and all("b" not in layer.adapters for layer in engine.layers.values())


# -- imports are validated like creations ------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": 0}, r"files\['adapter_config.json'\]\.r: 0; expected an integer in \[1, 128\]"),
        ({"r": 4096}, r"\.r: 4096"),
        ({"r": "4"}, r"\.r: '4'"),
        ({"r": 4, "lora_alpha": float("nan")}, r"\.lora_alpha: nan"),
        ({"lora_alpha": 8}, r"unreadable"),
    ],
)
def test_an_imported_adapter_is_validated_like_a_new_run(service, tmp_path, config, message):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(directory / "adapter_model.safetensors"))
    runs_before = len(service.create_rest_client().list_training_runs(limit=1000).result().training_runs)
    with pytest.raises(BadRequestError, match=message):
        service.create_training_client_from_peft_adapter(directory).result()
    runs_after = len(service.create_rest_client().list_training_runs(limit=1000).result().training_runs)
    assert runs_after == runs_before  # nothing half made


def test_an_adapter_uploads_in_pieces_of_any_number(service, tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(build_embedded_model(), config).save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(service_client, "UPLOAD_PIECE_BYTES", 1000)  # dozens of pieces
    training = service.create_training_client_from_peft_adapter(tmp_path / "adapter").result()
    assert training.get_info().lora_rank == 4
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        service.create_training_client_from_peft_adapter(tmp_path)
