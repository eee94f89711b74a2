"""SIGKILL the worker: the server starts a new one and brings every run back from its own
lineage (its creation, or the checkpoint it last saved or loaded). Read-only requests run on as
if nothing happened; a run that lost work says so, naming where it went back to, and refuses to
train on until the client acknowledges with load_state."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from server_process import running_server

from tinker_client import BadRequestError, InternalServerError, ServiceClient, types
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import ragged_batch

DATA = ragged_batch(seed=70, lengths=[10, 5])
ADAM = types.AdamParams(learning_rate=1e-2)


def worker_pids(log_path) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker pid (\d+)", log_path.read_text())]


def loss(training) -> float:
    return training.forward(DATA, "cross_entropy").result(timeout=120).metrics["loss:sum"]


def step(training) -> None:
    training.forward_backward(DATA, "cross_entropy")
    training.optim_step(ADAM).result(timeout=120)


def test_a_killed_worker_brings_every_run_back_from_its_own_lineage(tmp_path):
    with running_server(tmp_path) as address:
        service = ServiceClient(base_url=address)
        saved = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        step(saved)
        saved.save_state("before-crash").result()
        saved_loss = loss(saved)

        branched = service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()
        step(branched)
        first = branched.save_state("a").result().path
        step(branched)
        branched.save_state("b").result()  # the newest checkpoint, but not where the run is now
        branched.load_state_with_optimizer(first).result()
        branched_loss = loss(branched)

        untouched = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
        untouched_loss = loss(untouched)

        torch.manual_seed(0)
        adapter = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(build_embedded_model(), adapter).save_pretrained(tmp_path / "adapter")
        imported = service.create_training_client_from_peft_adapter(tmp_path / "adapter").result()
        imported_loss = loss(imported)  # its restore point is the import: no optimizer state to need

        busy = service.create_lora_training_client(BASE_MODEL, rank=4, seed=4).result()
        initial_loss = loss(busy)
        in_flight = busy.forward_backward(ragged_batch(seed=71, lengths=[1000] * 16), "cross_entropy")
        time.sleep(0.3)  # the big forward_backward is running
        pipelined = busy.optim_step(ADAM)  # would apply to gradients the crash loses
        read_only = saved.forward(DATA, "cross_entropy")  # waits behind it, not started
        (pid,) = worker_pids(tmp_path / "server.log")
        os.kill(pid, signal.SIGKILL)

        with pytest.raises(InternalServerError, match=r"went back to its creation \(step 0\)"):
            in_flight.result(timeout=120)
        with pytest.raises(BadRequestError, match="went back to its creation"):
            pipelined.result(timeout=120)
        with pytest.raises(BadRequestError, match=f"load_state\\('tinker://{busy.model_id}/initial'\\)"):
            busy.optim_step(ADAM).result(timeout=120)
        assert read_only.result(timeout=120).metrics["loss:sum"] == pytest.approx(saved_loss, rel=1e-5)
        assert len(worker_pids(tmp_path / "server.log")) == 2

        busy.load_state(f"tinker://{busy.model_id}/initial").result(timeout=120)  # acknowledged
        assert loss(busy) == pytest.approx(initial_loss, rel=1e-5)
        step(busy)
        step(saved)  # its optimizer state came back too
        assert loss(branched) == pytest.approx(branched_loss, rel=1e-5)  # from 'a', where it was
        assert loss(untouched) == pytest.approx(untouched_loss, rel=1e-5)  # rebuilt from its seed
        assert loss(imported) == pytest.approx(imported_loss, rel=1e-5)
        step(imported)
        service.close()


def test_an_idle_worker_that_dies_is_replaced_at_once(tmp_path):
    with running_server(tmp_path) as address:
        service = ServiceClient(base_url=address)
        trained = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
        step(trained)
        clean = service.create_lora_training_client(BASE_MODEL, rank=4, seed=6).result()
        clean_loss = loss(clean)
        (pid,) = worker_pids(tmp_path / "server.log")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(worker_pids(tmp_path / "server.log")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # no request sent: the server noticed on its own
        assert len(worker_pids(tmp_path / "server.log")) == 2
        assert loss(clean) == pytest.approx(clean_loss, rel=1e-5)
        with pytest.raises(BadRequestError, match=r"went back to its creation \(step 0\)"):
            trained.forward_backward(DATA, "cross_entropy").result(timeout=120)
        service.close()


def test_a_crash_while_a_closed_sessions_run_waits_to_unload_does_not_bring_it_back(tmp_path):
    with running_server(tmp_path) as address:
        closing = ServiceClient(base_url=address)
        training = closing.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
        data = ragged_batch(seed=71, lengths=[128] * 8)

        async def queued() -> None:  # each await returns at the request's ack: all are queued
            for _ in range(16):
                await training.forward_backward_async(data, "cross_entropy")

        asyncio.run(queued())
        closing.close("interrupted")  # its unload waits behind the work
        (pid,) = worker_pids(tmp_path / "server.log")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while "worker restarted" not in (tmp_path / "server.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "worker restarted: 0 run(s) restored" in (tmp_path / "server.log").read_text()
        with ServiceClient(base_url=address) as again:
            assert again.get_server_capabilities().residency.resident_runs == 0
