"""Two training runs on one server: their rows share a batch, their weights stay apart."""

from __future__ import annotations

import time

import numpy as np
import torch

from tinker_client import types
from tinker_client._convert import forward_backward_input
from tinker_rpc.v1 import service_pb2
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import RawSession, adapter_tensors, ragged_batch, reference_logprobs, sampler_dir


def test_two_clients_share_one_batch_and_train_independently(service, server):
    alice = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    bob = service.create_lora_training_client(BASE_MODEL, rank=8, seed=2).result()
    bob_initial = adapter_tensors(sampler_dir(server.data_dir, bob.save_weights_for_sampler("init").result().path))
    alice_data, bob_data = ragged_batch(seed=10, lengths=[6, 13]), ragged_batch(seed=11, lengths=[21])

    # Keep the worker busy so both requests queue up and go out in the same cycle.
    blocker = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    busy = blocker.forward_backward(ragged_batch(seed=12, lengths=[1000] * 12), "cross_entropy")
    time.sleep(0.2)  # past the scheduler's coalescing window: the blocker is running
    sessions = [RawSession(server.address), RawSession(server.address)]
    try:
        for session, training, data in zip(sessions, (alice, bob), (alice_data, bob_data), strict=True):
            session.send(
                service_pb2.SessionRequest(
                    request_id="fb",
                    model_id=training.model_id,
                    forward_backward=forward_backward_input(data, "cross_entropy", None),
                )
            )
        answers = [[session.receive(), session.receive()] for session in sessions]
    finally:
        for session in sessions:
            session.close()
    busy.result(timeout=120)
    alice_result, bob_result = (answer[1].result for answer in answers)
    assert alice_result.cycle_id == bob_result.cycle_id != 0

    # In the shared batch each row went through its own adapter (both still at B = 0).
    model = build_embedded_model()
    with torch.no_grad():
        for result, data in ((alice_result, alice_data), (bob_result, bob_data)):
            for output, datum in zip(result.forward_backward.loss_fn_outputs, data, strict=True):
                logprobs = np.frombuffer(output.tensors["logprobs"].data, np.float32)
                np.testing.assert_allclose(logprobs, reference_logprobs(model, datum).numpy(), atol=1e-4)

    # Alice steps (her first step also applies the gradients of the shared pass); Bob never
    # does, so his adapter must stay exactly as created. A twin of Alice trained alone must
    # end where she does: none of Bob's rows leaked into her gradients. A large eps makes
    # Adam's step linear in the gradient (about lr * g / eps), so float noise from different
    # batch paddings stays at noise level while a leaked gradient would not.
    twin = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    twin.forward_backward(alice_data, "cross_entropy")
    for training in (alice, twin):
        for _ in range(3):
            training.forward_backward(alice_data, "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=0.1, eps=10.0))
    alice_after = alice.forward(alice_data, "cross_entropy").result().loss_fn_outputs
    alice_saved = adapter_tensors(sampler_dir(server.data_dir, alice.save_weights_for_sampler("a").result().path))
    twin_saved = adapter_tensors(sampler_dir(server.data_dir, twin.save_weights_for_sampler("t").result().path))
    for key, value in twin_saved.items():
        torch.testing.assert_close(alice_saved[key], value, atol=1e-6, rtol=1e-5, msg=key)
    bob_after = bob.forward(bob_data, "cross_entropy").result().loss_fn_outputs
    bob_saved = adapter_tensors(sampler_dir(server.data_dir, bob.save_weights_for_sampler("after").result().path))

    for key, value in bob_initial.items():
        assert torch.equal(bob_saved[key], value), key
    with torch.no_grad():
        np.testing.assert_allclose(
            bob_after[0]["logprobs"].to_numpy(), reference_logprobs(model, bob_data[0]).numpy(), atol=1e-4
        )
        assert not np.allclose(
            alice_after[0]["logprobs"].to_numpy(), reference_logprobs(model, alice_data[0]).numpy(), atol=1e-3
        )


def test_fixed_cycles_batch_what_arrives_within_a_tick(tmp_path):
    from server_process import running_server

    from tinker_client import ServiceClient

    with running_server(tmp_path, ["--cycle", "fixed:0.5"]) as address:
        service = ServiceClient(base_url=address)
        # Created at once: their results arrive together (a client once deadlocked on exactly that).
        creating = [service.create_lora_training_client(BASE_MODEL, rank=4, seed=seed) for seed in (1, 2, 3)]
        runs = [future.result(timeout=30) for future in creating]
        sessions = [RawSession(address) for _ in runs]
        try:
            for session, training in zip(sessions, runs, strict=True):
                session.send(
                    service_pb2.SessionRequest(
                        request_id="fb",
                        model_id=training.model_id,
                        forward=forward_backward_input(ragged_batch(seed=20, lengths=[8]), "cross_entropy", None),
                    )
                )
            cycles = [[session.receive(), session.receive()][1].result.cycle_id for session in sessions]
        finally:
            for session in sessions:
                session.close()
        service.close()
    # Sent within milliseconds of each other: at most one tick can fall between them, so at
    # least two of the three tenants share a batch (nearly always all three do).
    assert max(cycles.count(cycle) for cycle in cycles) >= 2
