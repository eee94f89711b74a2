"""A connection cut mid-training: the loop finishes as if nothing happened, no step twice."""

from __future__ import annotations

import time

import pytest
import torch

from tinker_client import ServiceClient, types

from .conftest import BASE_MODEL
from .helpers import adapter_tensors, ragged_batch, sampler_dir
from .proxy import CuttableProxy

DATA = ragged_batch(seed=50, lengths=[12, 7])
ADAM = types.AdamParams(learning_rate=1e-2)
STEPS = 8


def train(training, cut=lambda step: None) -> list[float]:
    losses = []
    for step in range(STEPS):
        backward = training.forward_backward(DATA, "cross_entropy")
        optim = training.optim_step(ADAM)
        cut(step)  # while both requests are on the wire or in flight
        losses.append(backward.result(timeout=120).metrics["loss:sum"])
        optim.result(timeout=120)
    return losses


def test_training_through_cut_connections_equals_an_uninterrupted_run(server, service):
    reference = service.create_lora_training_client(BASE_MODEL, rank=4, seed=13).result()
    expected_losses = train(reference)
    expected = adapter_tensors(sampler_dir(server.data_dir, reference.save_weights_for_sampler("ref").result().path))

    proxy = CuttableProxy(server.address)
    try:
        client = ServiceClient(base_url=proxy.address)
        training = client.create_lora_training_client(BASE_MODEL, rank=4, seed=13).result()

        def cut(step: int) -> None:
            if step % 2 == 1:
                if step == 5:
                    time.sleep(0.05)  # let this pair be acked first: it must come back by resume
                proxy.cut()

        losses = train(training, cut)
        path = training.save_weights_for_sampler("cut").result(timeout=120).path
        cuts = proxy.cuts
        client.close()
    finally:
        proxy.close()
    assert cuts == STEPS // 2
    assert losses == expected_losses  # every step exactly once, in order
    actual = adapter_tensors(sampler_dir(server.data_dir, path))
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_an_expired_result_fails_clearly(tmp_path):
    from server_process import running_server

    from tinker_client import NotFoundError
    from tinker_client._convert import forward_backward_input
    from tinker_rpc.v1 import service_pb2

    from .helpers import RawSession

    with running_server(tmp_path, ["--result-retention-seconds", "0.5", "--sweep-interval", "0.2"]) as address:
        service = ServiceClient(base_url=address)
        training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
        session = RawSession(address)
        session.send(
            service_pb2.SessionRequest(
                request_id="a", model_id=training.model_id, forward=forward_backward_input(DATA, "cross_entropy", None)
            )
        )
        future_id = session.receive().ack.future_id
        session.receive()
        time.sleep(1.0)
        session.send(service_pb2.SessionRequest(request_id="b", resume=service_pb2.ResumeRequest(future_id=future_id)))
        expired = session.receive().result.error
        session.close()
        assert expired.code == 5 and "expired after 0.5s" in expired.message
        with pytest.raises(NotFoundError, match="expired"):
            service._connection.unary_sync(
                service._connection.stub.GetFutureResult, service_pb2.GetFutureResultRequest(future_id=future_id)
            )
        service.close()
