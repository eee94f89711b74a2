"""SIGKILL the worker mid-cycle: the cycle fails with UNAVAILABLE, the server restarts the
worker, restores saved runs, and serves on (queued requests included)."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from server_process import running_server

from tinker_client import APIConnectionError, BadRequestError, ServiceClient, types

from .conftest import BASE_MODEL
from .helpers import ragged_batch

DATA = ragged_batch(seed=70, lengths=[10, 5])


def worker_pids(log_path) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker pid (\d+)", log_path.read_text())]


def test_a_killed_worker_is_replaced_and_saved_runs_go_on(tmp_path):
    with running_server(tmp_path) as address:
        service = ServiceClient(base_url=address)
        saved = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        saved.forward_backward(DATA, "cross_entropy")
        saved.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        checkpoint = saved.save_state("before-crash").result().path
        expected = saved.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
        unsaved = service.create_lora_training_client(BASE_MODEL, rank=4, seed=2).result()

        busy = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
        in_flight = busy.forward_backward(ragged_batch(seed=71, lengths=[1000] * 16), "cross_entropy")
        time.sleep(0.3)  # the big forward_backward is running
        queued = saved.forward(DATA, "cross_entropy")  # waits behind it, not started
        (pid,) = worker_pids(tmp_path / "server.log")
        os.kill(pid, signal.SIGKILL)

        with pytest.raises(APIConnectionError, match="worker process exited.*restored 1 run"):
            in_flight.result(timeout=120)
        # The queued request ran on the new worker, on the restored weights.
        assert queued.result(timeout=120).metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert len(worker_pids(tmp_path / "server.log")) == 2
        saved.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # optimizer state came back too
        with pytest.raises(BadRequestError, match="worker crashed.*no saved checkpoint"):
            unsaved.forward(DATA, "cross_entropy").result(timeout=60)
        fresh = service.create_lora_training_client(BASE_MODEL, rank=4, seed=4).result()
        assert fresh.forward(DATA, "cross_entropy").result(timeout=60).metrics["loss:sum"] > 0
        assert service.create_training_client_from_state(checkpoint).result().forward(DATA, "cross_entropy").result(
            timeout=60
        ).metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        service.close()
