"""Checkpoints: peft format, exact resumption, deletion, TTL, import, concurrency, the CLI."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from server_process import running_server

from tinker_client import BadRequestError, ConflictError, NotFoundError, ServiceClient, types
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import adapter_tensors, ragged_batch, reference_logprobs

DATA = ragged_batch(seed=30, lengths=[9, 14])
ADAM = types.AdamParams(learning_rate=1e-2, weight_decay=0.01)


def train(training, steps: int) -> None:
    for _ in range(steps):
        training.forward_backward(DATA, "cross_entropy").result()
        training.optim_step(ADAM).result()


def checkpoint_dir(data_dir: Path, path: str) -> Path:
    model_id, kind, name = path.removeprefix("tinker://").split("/")
    return data_dir / "runs" / model_id / kind / name


def test_a_downloaded_archive_loads_in_peft_with_the_servers_logits(service, tmp_path):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=1).result()
    train(training, 3)
    path = training.save_state("three-steps").result().path
    assert path == f"tinker://{training.model_id}/weights/three-steps"
    served = training.forward(DATA, "cross_entropy").result()

    progress = []
    archive = (
        service.create_rest_client()
        .download_checkpoint_archive_from_tinker_path(
            path, tmp_path / "ckpt.tar", lambda done, total: progress.append((done, total))
        )
        .result()
    )
    assert progress and progress[-1][0] == progress[-1][1] == archive.stat().st_size
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"]
        tar.extractall(tmp_path / "adapter", filter="data")
    model = PeftModel.from_pretrained(build_embedded_model(), str(tmp_path / "adapter"))
    with torch.no_grad():
        for datum, output in zip(DATA, served.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(
                output["logprobs"].to_numpy(), reference_logprobs(model, datum).numpy(), atol=1e-4
            )


def test_resuming_with_the_optimizer_is_bit_for_bit_and_without_it_is_not(service, server):
    uninterrupted = service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
    train(uninterrupted, 2)
    middle = uninterrupted.save_state("middle").result().path
    train(uninterrupted, 2)
    expected = adapter_tensors(checkpoint_dir(server.data_dir, uninterrupted.save_state("end").result().path))

    resumed = service.create_training_client_from_state_with_optimizer(middle).result()
    assert resumed.get_info().lora_config.seed == 2 and resumed.get_info().lora_rank == 4
    train(resumed, 2)
    actual = adapter_tensors(checkpoint_dir(server.data_dir, resumed.save_state("end").result().path))
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key

    fresh_moments = service.create_training_client_from_state(middle).result()
    train(fresh_moments, 2)
    other = adapter_tensors(checkpoint_dir(server.data_dir, fresh_moments.save_state("end").result().path))
    assert any(not torch.equal(other[key], value) for key, value in expected.items())

    reloaded = service.create_lora_training_client(BASE_MODEL, rank=4, seed=99).result()
    reloaded.load_state_with_optimizer(middle).result()
    train(reloaded, 2)
    again = adapter_tensors(checkpoint_dir(server.data_dir, reloaded.save_state("end").result().path))
    for key, value in expected.items():
        assert torch.equal(again[key], value), key


def test_load_state_needs_a_matching_adapter(service):
    small = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    path = small.save_state("small").result().path
    big = service.create_lora_training_client(BASE_MODEL, rank=8, seed=1).result()
    with pytest.raises(BadRequestError, match="does not fit this run's"):
        big.load_state(path).result(timeout=30)
    sampler_path = small.save_weights_for_sampler("s").result().path
    with pytest.raises(BadRequestError, match="holds no optimizer state"):
        small.load_state_with_optimizer(sampler_path).result(timeout=30)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "", "x" * 129, "sp ace"])
def test_checkpoint_names_cannot_escape_or_be_odd(service, server, name):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    with pytest.raises(BadRequestError, match=r"save_state\.name"):
        training.save_state(name).result(timeout=30)
    assert not (server.data_dir / "runs" / training.model_id / "escape").exists()


def test_a_name_is_not_overwritten_unless_asked(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    training.save_state("same").result()
    with pytest.raises(ConflictError, match="already exists; pass overwrite=True"):
        training.save_state("same").result(timeout=30)
    train(training, 1)
    assert training.save_state("same", overwrite=True).result().path.endswith("/weights/same")
    training.save_weights_for_sampler("same").result()
    with pytest.raises(ConflictError, match="already exists"):
        training.save_weights_for_sampler("same").result(timeout=30)


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("tinker://run-nope/weights/x", NotFoundError, "no checkpoint"),
        ("tinker://run-nope/other/x", BadRequestError, "not a checkpoint path"),
        ("file:///etc/passwd", BadRequestError, "not a checkpoint path"),
        ("tinker://../weights/x", BadRequestError, "not a checkpoint path"),
        ("tinker://run-1/weights/..", BadRequestError, "not a checkpoint path"),
    ],
)
def test_bad_checkpoint_paths_are_rejected_and_touch_nothing(service, path, error, message):
    rest = service.create_rest_client()
    with pytest.raises(error, match=message):
        rest.delete_checkpoint_from_tinker_path(path).result(timeout=30)
    with pytest.raises(error, match=message):
        service.create_training_client_from_state(path).result()


def test_deleting_removes_files_and_record_and_listing_shows_disk_use(service, server):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    first = training.save_state("first").result().path
    second = training.save_weights_for_sampler("second").result().path
    rest = service.create_rest_client()
    listed = rest.list_checkpoints(training.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [first, second]
    assert [c.checkpoint_type for c in listed] == ["training", "sampler"]
    run = rest.get_training_run_by_tinker_path(first).result()
    assert run.size_bytes == sum(c.size_bytes for c in listed) > 0
    assert run.last_checkpoint.tinker_path == first and run.last_sampler_checkpoint.tinker_path == second

    rest.delete_checkpoint(training.model_id, "weights/first").result()
    assert not checkpoint_dir(server.data_dir, first).exists()
    assert [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints] == [second]
    with pytest.raises(NotFoundError):
        rest.delete_checkpoint_from_tinker_path(first).result(timeout=30)
    with pytest.raises(NotFoundError):
        service.create_sampling_client(model_path=first).result().sample(
            types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)
        ).result(timeout=30)

    assert rest.delete_all_checkpoints(training.model_id).result() == 1
    assert rest.list_checkpoints(training.model_id).result().checkpoints == []
    assert rest.get_training_run(training.model_id).result().size_bytes == 0
    with pytest.raises(NotFoundError, match="sampler_weights/second"):
        service.create_sampling_client(model_path=second).result().sample(
            types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)
        ).result(timeout=30)


def test_training_runs_are_listed_newest_first_in_pages(service):
    created = [
        service.create_lora_training_client(BASE_MODEL, rank=4, seed=i, user_metadata={"i": str(i)}).result()
        for i in range(3)
    ]
    rest = service.create_rest_client()
    page = rest.list_training_runs(limit=2, offset=0).result()
    assert [run.training_run_id for run in page.training_runs] == [created[2].model_id, created[1].model_id]
    assert page.cursor.total_count >= 3 and page.training_runs[0].user_metadata == {"i": "2"}
    assert rest.list_training_runs(limit=1, offset=2).result().training_runs[0].training_run_id == created[0].model_id


def test_many_concurrent_saves_and_deletes_leave_a_consistent_store(service, server):
    clients = [service.create_lora_training_client(BASE_MODEL, rank=4, seed=i).result() for i in range(3)]
    rest = service.create_rest_client()
    errors: list[BaseException] = []

    def churn(training) -> None:
        try:
            paths = [training.save_state(f"c{i}") for i in range(8)]
            paths = [future.result().path for future in paths]
            for path in paths[::2]:
                rest.delete_checkpoint_from_tinker_path(path).result()
        except BaseException as error:  # reported below, with the thread's context lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(training,)) for training in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    for training in clients:
        listed = {c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints}
        on_disk = {f"weights/{d.name}" for d in (server.data_dir / "runs" / training.model_id / "weights").iterdir()}
        assert listed == on_disk == {f"weights/c{i}" for i in range(1, 8, 2)}


def test_checkpoints_with_a_ttl_expire(tmp_path):
    with running_server(tmp_path, ["--sweep-interval", "0.2"]) as address:
        service = ServiceClient(base_url=address)
        training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        short = training.save_state("short", ttl_seconds=1).result().path
        kept = training.save_state("kept").result().path
        rest = service.create_rest_client()
        listed = {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
        assert listed[short].expires_at is not None and listed[kept].expires_at is None
        deadline = time.monotonic() + 10
        while short in [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints]:
            assert time.monotonic() < deadline, "the expired checkpoint was never deleted"
            time.sleep(0.2)
        assert not checkpoint_dir(tmp_path, short).exists() and checkpoint_dir(tmp_path, kept).exists()
        with pytest.raises(BadRequestError, match="ttl_seconds: 0"):
            training.save_state("never", ttl_seconds=0).result(timeout=30)
        with pytest.raises(BadRequestError, match=f"ttl_seconds: {2**40}; must be from 1 to"):  # past year 9999
            rest.set_checkpoint_ttl_from_tinker_path(kept, 2**40).result(timeout=30)
        assert [c.expires_at for c in rest.list_checkpoints(training.model_id).result().checkpoints] == [None]
        service.close()


def test_a_peft_adapter_is_imported_and_checked_against_the_base_model(service, tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(build_embedded_model(), config)
    model.save_pretrained(tmp_path / "adapter")

    training = service.create_training_client_from_peft_adapter(
        tmp_path / "adapter", user_metadata={"from": "peft"}
    ).result()
    info = training.get_info()
    assert (info.lora_rank, info.lora_config.train_attn, info.lora_config.train_mlp) == (4, True, False)
    output = training.forward(DATA, "cross_entropy").result()
    with torch.no_grad():
        for datum, outputs in zip(DATA, output.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(
                outputs["logprobs"].to_numpy(), reference_logprobs(model, datum).numpy(), atol=1e-4
            )
    train(training, 1)  # and it trains on

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_bytes((tmp_path / "adapter" / "adapter_config.json").read_bytes())
    from safetensors.torch import save_file

    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 99),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(256, 4),
        },
        str(wrong / "adapter_model.safetensors"),
    )
    with pytest.raises(
        BadRequestError, match=r"q_proj\.lora_A\.weight: shape \[4, 99\]; this base model needs \[4, 256\]"
    ):
        service.create_training_client_from_peft_adapter(wrong).result()


def test_the_cli_lists_runs_and_checkpoints_and_downloads(service, server, tmp_path):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    path = training.save_state("for-cli").result().path

    def cli(*args: str) -> str:
        command = [sys.executable, "-m", "tinker_client.cli", "--base-url", server.address, *args]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout

    sampling_only = service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
    sampling_only.save_weights_for_sampler("for-cli").result()
    rows = [re.split(r"\s{2,}", line) for line in cli("runs", "list", "--limit", "100").splitlines()]
    runs = {row[0]: row for row in rows}
    assert runs[training.model_id][4] != "-" and runs[sampling_only.model_id][4] != "-"  # LAST CHECKPOINT, either kind
    listing = cli("checkpoints", "list", training.model_id)
    assert path in listing and "training" in listing and "never" in listing
    cli("checkpoints", "download", path, "-o", str(tmp_path / "out.tar"))
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert "adapter_model.safetensors" in tar.getnames()
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinker_client.cli",
            "--base-url",
            server.address,
            "checkpoints",
            "delete",
            "tinker://x/weights/y",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and "no checkpoint tinker://x/weights/y" in failed.stderr
