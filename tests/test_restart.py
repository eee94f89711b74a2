"""A server killed and restarted on the same --data-dir keeps runs, checkpoints and results."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from server_process import start_server, stop_server

from tinker_client import APIConnectionError, ServiceClient, types
from tinker_client._convert import forward_backward_input
from tinker_rpc.v1 import service_pb2

from .conftest import BASE_MODEL
from .helpers import RawSession, adapter_tensors, ragged_batch

DATA = ragged_batch(seed=40, lengths=[11, 6])
ADAM = types.AdamParams(learning_rate=1e-2)
GREEDY = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
PROMPT = types.ModelInput.from_ints([256, 72, 105])


def train(training, steps: int) -> None:
    for _ in range(steps):
        training.forward_backward(DATA, "cross_entropy").result()
        training.optim_step(ADAM).result()


def test_save_kill_restart_load_continue_equals_an_uninterrupted_run(tmp_path):
    process, address = start_server(tmp_path)
    try:
        service = ServiceClient(base_url=address)
        training = service.create_lora_training_client(
            BASE_MODEL, rank=4, seed=5, user_metadata={"job": "restart"}
        ).result()
        train(training, 2)
        checkpoint = training.save_state("step-2").result().path
        sampler = training.save_weights_and_get_sampling_client("step-2").result()
        sampled_before = sampler.sample(PROMPT, 1, GREEDY).result().sequences[0]
        session = RawSession(address)
        session.send(
            service_pb2.SessionRequest(
                request_id="f", model_id=training.model_id, forward=forward_backward_input(DATA, "cross_entropy", None)
            )
        )
        ack, result_before = session.receive(), session.receive()
        session.close()
        service.close()
    finally:
        process.kill()  # no goodbye: SIGKILL
        process.wait()

    process, address = start_server(tmp_path)
    try:
        service = ServiceClient(base_url=address)
        rest = service.create_rest_client()
        run = rest.get_training_run(training.model_id).result()
        assert run.user_metadata == {"job": "restart"} and run.last_checkpoint.tinker_path == checkpoint
        assert {c.checkpoint_id for c in rest.list_checkpoints(training.model_id).result().checkpoints} == {
            "weights/step-2",
            "sampler_weights/step-2",
        }
        # A result completed before the restart is still retrievable by its future_id.
        retrieved = service._connection.unary_sync(
            service._connection.stub.GetFutureResult, service_pb2.GetFutureResultRequest(future_id=ack.ack.future_id)
        ).result
        assert retrieved == result_before.result
        # The saved sampler weights still sample, exactly as before.
        sampled_after = (
            service.create_sampling_client(model_path=sampler.model_path).result().sample(PROMPT, 1, GREEDY).result()
        )
        assert sampled_after.sequences[0].tokens == sampled_before.tokens
        # The old run's unsaved in-memory state is gone: a clear error says what to do.
        session = RawSession(address)
        session.send(
            service_pb2.SessionRequest(
                request_id="g", model_id=training.model_id, forward=forward_backward_input(DATA, "cross_entropy", None)
            )
        )
        stale = session.receive().result.error
        session.close()
        assert stale.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "server restarted" in stale.message and f"last checkpoint is {checkpoint}" in stale.message
        with pytest.raises(APIConnectionError, match="closed"):
            training.forward(DATA, "cross_entropy").result(timeout=30)  # its client was closed

        resumed = service.create_training_client_from_state_with_optimizer(checkpoint).result()
        train(resumed, 2)
        resumed_final = adapter_tensors(_directory(tmp_path, resumed.save_state("end").result().path))
        uninterrupted = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
        train(uninterrupted, 4)
        expected = adapter_tensors(_directory(tmp_path, uninterrupted.save_state("end").result().path))
        for key, value in expected.items():
            assert torch.equal(resumed_final[key], value), key
        np.testing.assert_array_equal(
            resumed.forward(DATA, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy(),
            uninterrupted.forward(DATA, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy(),
        )
        service.close()
    finally:
        stop_server(process)


def _directory(data_dir, path: str):
    model_id, kind, name = path.removeprefix("tinker://").split("/")
    return data_dir / "runs" / model_id / kind / name
