"""A server killed and restarted on the same --data-dir keeps runs, checkpoints and results."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from server_process import start_server, stop_server

from tinker_client import BadRequestError, ServiceClient, TrainingClient, _convert, types
from tinker_client._convert import forward_backward_input
from tinker_rpc.v1 import sampling_pb2, service_pb2

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


def test_after_a_kill_every_run_comes_back_from_its_own_restore_point(tmp_path):
    process, address = start_server(tmp_path)
    try:
        service = ServiceClient(base_url=address)  # never closed: its runs stay open
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
        moved_on = service.create_lora_training_client(BASE_MODEL, rank=4, seed=6).result()
        train(moved_on, 1)
        moved_on_checkpoint = moved_on.save_state("step-1").result().path
        train(moved_on, 1)  # the kill loses this step
        untouched = service.create_lora_training_client(BASE_MODEL, rank=4, seed=7).result()
        session_id = service._session.result()
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

        # The run had lost nothing since its checkpoint: it goes on by its id, as if never stopped.
        same_run = TrainingClient(service._connection, training.get_info())
        forward_after = same_run.forward(DATA, "cross_entropy").result()
        np.testing.assert_array_equal(
            forward_after.loss_fn_outputs[0]["logprobs"].to_numpy(),
            _convert.forward_backward_output(result_before.result).loss_fn_outputs[0]["logprobs"].to_numpy(),
        )
        train(same_run, 2)
        resumed_final = adapter_tensors(_directory(tmp_path, same_run.save_state("end").result().path))
        uninterrupted = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
        train(uninterrupted, 4)
        expected = adapter_tensors(_directory(tmp_path, uninterrupted.save_state("end").result().path))
        for key, value in expected.items():
            assert torch.equal(resumed_final[key], value), key

        # The other had moved on: it says where it went back to, and goes on once acknowledged.
        moved_on_again = TrainingClient(service._connection, moved_on.get_info())
        with pytest.raises(BadRequestError, match=rf"server restarted.*went back to {moved_on_checkpoint} \(step 1\)"):
            moved_on_again.forward(DATA, "cross_entropy").result(timeout=60)
        moved_on_again.load_state_with_optimizer(moved_on_checkpoint).result()
        train(moved_on_again, 1)

        # Closing the first session, from anywhere, closes its runs not brought back yet too.
        request = service_pb2.CloseSessionRequest(session_id=session_id, status="success")
        service._connection.unary_sync(service._connection.stub.CloseSession, request)
        with pytest.raises(BadRequestError, match="its session was closed"):
            TrainingClient(service._connection, untouched.get_info()).forward(DATA, "cross_entropy").result()
        service.close()
    finally:
        stop_server(process)


def _directory(data_dir, path: str):
    model_id, kind, name = path.removeprefix("tinker://").split("/")
    return data_dir / "runs" / model_id / kind / name


def _sample_request(request_id: str, key: str, model_path: str) -> service_pb2.SessionRequest:
    sample = sampling_pb2.SampleRequest(
        model_path=model_path,
        prompt=_convert.model_input(PROMPT),
        num_samples=1,
        sampling_params=_convert.sampling_params(GREEDY),
    )
    return service_pb2.SessionRequest(request_id=request_id, idempotency_key=key, sample=sample)


def _heavy_forward(request_id: str, key: str, model_id: str) -> service_pb2.SessionRequest:
    data = ragged_batch(seed=41, lengths=[256] * 16)
    forward = forward_backward_input(data, "cross_entropy", None)
    return service_pb2.SessionRequest(request_id=request_id, idempotency_key=key, model_id=model_id, forward=forward)


def test_after_a_kill_a_resend_is_answered_by_the_original_never_run_again_and_seq_goes_on(tmp_path):
    process, address = start_server(tmp_path)
    try:
        service = ServiceClient(base_url=address)  # left open: closing its session would free the run
        training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=6).result()
        model_path = training.save_weights_for_sampler("kept").result().path
        session = RawSession(address)
        session.send(_sample_request("done", "sample-1", model_path))
        done_ack, done_result = session.receive(), session.receive()
        for index in range(8):  # queued behind one another: the last cannot finish before the kill
            session.send(_heavy_forward(f"heavy-{index}", f"heavy-{index}", training.model_id))
        acks: dict[str, service_pb2.SessionResponse] = {}
        while "heavy-7" not in acks:
            response = session.receive()
            assert not response.result.HasField("error"), response.result.error.message
            if response.HasField("ack"):
                acks[response.request_id] = response
    finally:
        process.kill()  # no goodbye: SIGKILL
        process.wait()

    process, address = start_server(tmp_path)
    try:
        session = RawSession(address)
        session.send(_sample_request("again", "sample-1", model_path))  # its ack was lost, say: resent
        assert session.receive().ack == done_ack.ack
        assert session.receive().result == done_result.result  # answered, not run a second time
        session.send(_heavy_forward("heavy-again", "heavy-7", training.model_id))
        assert session.receive().ack == acks["heavy-7"].ack
        lost = session.receive().result.error
        assert lost.code == grpc.StatusCode.ABORTED.value[0] and "before this request finished" in lost.message
        session.send(_sample_request("next", "sample-2", model_path))
        assert session.receive().ack.seq == done_ack.ack.seq + 1  # the sampler's order goes on
        session.close()
    finally:
        stop_server(process)
