"""Chaos: four tenants train with pipelined requests while the worker is SIGKILLed twice and the
whole server once, then restarted on the same data dir and port.

Every request ends with exactly one result or an error that says what was lost; every run trains
on afterwards; each final adapter equals a fault-free replay of exactly the steps its tenant was
told were applied (a rollback says to which step); `seq` goes on across the restart."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import torch
from server_process import start_server, stop_server

from tinker_client import APIError, ServiceClient, types
from tinker_client._convert import forward_backward_input
from tinker_rpc.v1 import service_pb2

from .conftest import BASE_MODEL
from .helpers import RawSession, adapter_tensors, ragged_batch

TENANTS = ("ann", "ben", "cat", "dan")
STEPS = 14
ADAM = types.AdamParams(learning_rate=1e-3)
"""Small enough that two ways of batching the same steps (tenants share cycles differently in a
replay) stay within float noise: at 1e-2 this model's training amplifies that noise to a step's size.
A step moves every weight by about 1e-3, so one applied twice or lost shows far above REPLAY_ATOL."""
REPLAY_ATOL = 2e-5
ROLLBACK = re.compile(r"went back to (.+?) \(step (\d+)\).*load_state\('([^']+)'\)")


def batch(seed: int) -> list[types.Datum]:
    return ragged_batch(seed=seed, lengths=[12, 7])


class Tenant:
    """Trains one run, pipelining each forward_backward with its optim_step, saving now and then;
    keeps the batches it was told were applied, and follows what a rollback says."""

    def __init__(self, address: str, key: str, seed: int) -> None:
        self.service = ServiceClient(base_url=address, api_key=key, reconnect_timeout=120)
        self.training = self.service.create_lora_training_client(BASE_MODEL, rank=4, seed=seed).result()
        self.seed = seed
        self.applied: list[int] = []
        self.completed = 0  # steps answered as applied, rolled back or not: progress for the chaos
        self.rollbacks = 0
        self.unexplained: list[str] = []

    def run(self) -> None:
        step = 0
        while len(self.applied) < STEPS and step < 4 * STEPS:
            step += 1
            batch_seed = 1000 * self.seed + step
            backward = self.training.forward_backward(batch(batch_seed), "cross_entropy")
            optimized = self.training.optim_step(ADAM)
            try:
                backward.result(timeout=180)
                optimized.result(timeout=180)
            except APIError as error:
                self._recover(str(error))
                continue
            self.applied.append(batch_seed)
            self.completed += 1
            if len(self.applied) % 4 == 0:
                self._call(lambda: self.training.save_state(f"step-{len(self.applied)}").result(timeout=180))

    def _recover(self, message: str) -> None:
        rollback = ROLLBACK.search(message)
        if rollback is None:  # lost with its cycle (the run itself went back: the next request says where)
            if not re.search(r"worker (failed|died)|did not complete|did not run", message):
                self.unexplained.append(message)
            return
        self.rollbacks += 1
        del self.applied[int(rollback.group(2)) :]
        path = rollback.group(3)
        load = self.training.load_state if path.endswith("/initial") else self.training.load_state_with_optimizer
        self._call(lambda: load(path).result(timeout=180))

    def _call(self, action) -> None:
        try:
            action()
        except APIError as error:
            self._recover(str(error))


def progress(tenants: list[Tenant], steps: int, timeout: float = 120) -> None:
    """Waits until every tenant has completed `steps` more steps."""
    targets = [tenant.completed + steps for tenant in tenants]
    deadline = time.monotonic() + timeout
    while any(tenant.completed < target for tenant, target in zip(tenants, targets, strict=True)):
        assert time.monotonic() < deadline, "the tenants stopped making progress"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_pid(log: Path) -> int:
    return int(re.findall(r"worker pid (\d+)", log.read_text())[-1])


def probe_seq(address: str, model_id: str, request_id: str) -> int:
    session = RawSession(address, api_key="ann-key")
    forward = forward_backward_input(batch(1), "cross_entropy", None)
    session.send(service_pb2.SessionRequest(request_id=request_id, model_id=model_id, forward=forward))
    ack = session.receive()
    session.receive()
    session.close()
    return ack.ack.seq


def test_tenants_train_through_worker_and_server_kills_exactly_once(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{name}-key {name}\n" for name in TENANTS))
    port = free_port()
    options = ["--api-keys-file", str(keys), "--port", str(port)]
    process, address = start_server(tmp_path, options)
    try:
        tenants = [Tenant(address, f"{name}-key", seed) for seed, name in enumerate(TENANTS)]
        probe = ServiceClient(base_url=address, api_key="ann-key").create_lora_training_client(BASE_MODEL, rank=4)
        probe_run = probe.result().model_id
        seq_before = probe_seq(address, probe_run, "probe-1")
        threads = [threading.Thread(target=tenant.run) for tenant in tenants]
        for thread in threads:
            thread.start()
        for _ in range(2):
            progress(tenants, 2)
            os.kill(worker_pid(tmp_path / "server.log"), signal.SIGKILL)
        progress(tenants, 2)
        process.kill()
        process.wait()
        process, address = start_server(tmp_path, options)
        for thread in threads:
            thread.join(timeout=240)
        assert not any(thread.is_alive() for thread in threads)
        seq_after = probe_seq(address, probe_run, "probe-2")
        assert seq_after == seq_before + 1  # no restart resets it, nothing internal took a place

        replayer = ServiceClient(base_url=address, api_key="ann-key")
        for tenant in tenants:
            assert tenant.unexplained == []
            assert len(tenant.applied) == STEPS  # every run trained on to the end
            final = tenant.training.save_state("final").result(timeout=120).path
            replay = replayer.create_lora_training_client(BASE_MODEL, rank=4, seed=tenant.seed).result()
            for batch_seed in tenant.applied:
                replay.forward_backward(batch(batch_seed), "cross_entropy")
                replay.optim_step(ADAM)
            replayed = replay.save_state("replay").result(timeout=120).path
            mine, expected = (adapter_tensors(_directory(tmp_path, path)) for path in (final, replayed))
            for key, value in expected.items():
                torch.testing.assert_close(mine[key], value, rtol=0, atol=REPLAY_ATOL)
        assert sum(tenant.rollbacks for tenant in tenants) >= 1  # the faults did cost someone work
    finally:
        stop_server(process)


def _directory(data_dir: Path, path: str) -> Path:
    model_id, kind, name = path.removeprefix("tinker://").split("/")
    return data_dir / "runs" / model_id / kind / name
