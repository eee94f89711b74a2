"""The Session stream: ack before result, `seq` order, and rejection without an ack."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from tinker_client import BadRequestError, NotFoundError, types
from tinker_client._convert import adam_params, forward_backward_input
from tinker_rpc.v1 import service_pb2, training_pb2
from tinker_wire.batches import ENTRY_FRAMING_BYTES, take_queued

from .conftest import BASE_MODEL
from .helpers import RawSession, ragged_batch


def create_model_request(request_id: str, seed: int) -> service_pb2.SessionRequest:
    return service_pb2.SessionRequest(
        request_id=request_id,
        create_model=training_pb2.CreateModelRequest(
            base_model=BASE_MODEL,
            lora_config=training_pb2.LoraConfig(rank=4, seed=seed, train_attn=True, train_mlp=True),
        ),
    )


def test_each_request_is_acked_with_its_seq_before_its_result(server):
    session = RawSession(server.address)
    try:
        session.send(create_model_request("create", seed=1))
        ack, result = session.receive(), session.receive()
        assert ack.request_id == "create" and ack.HasField("ack") and ack.ack.seq == 1
        assert result.HasField("result") and result.result.future_id == ack.ack.future_id
        model_id = result.result.create_model.model_id

        data = ragged_batch(seed=0, lengths=[7, 3])
        session.send(
            service_pb2.SessionRequest(
                request_id="fb", model_id=model_id, forward_backward=forward_backward_input(data, "cross_entropy", None)
            )
        )
        session.send(
            service_pb2.SessionRequest(
                request_id="step",
                model_id=model_id,
                optim_step=training_pb2.OptimStepRequest(adam_params=adam_params(types.AdamParams(learning_rate=0.05))),
            )
        )
        session.send(
            service_pb2.SessionRequest(
                request_id="fwd", model_id=model_id, forward=forward_backward_input(data, "cross_entropy", None)
            )
        )
        responses = [session.receive() for _ in range(6)]
    finally:
        session.close()

    acks = {r.request_id: r.ack for r in responses if r.HasField("ack")}
    results = {r.request_id: r.result for r in responses if r.HasField("result")}
    assert [acks[name].seq for name in ("fb", "step", "fwd")] == [2, 3, 4]
    order = [(r.request_id, r.WhichOneof("response")) for r in responses]
    for name in ("fb", "step", "fwd"):
        assert order.index((name, "ack")) < order.index((name, "result"))
        assert results[name].future_id == acks[name].future_id
        assert not results[name].HasField("error"), results[name].error
    # The forward was submitted after the step, so it sees the stepped weights.
    before = np.frombuffer(results["fb"].forward_backward.loss_fn_outputs[0].tensors["logprobs"].data, np.float32)
    after = np.frombuffer(results["fwd"].forward_backward.loss_fn_outputs[0].tensors["logprobs"].data, np.float32)
    assert not np.allclose(before, after, atol=1e-3)


def test_an_invalid_request_gets_an_error_result_and_no_ack(server):
    session = RawSession(server.address)
    try:
        data = ragged_batch(seed=0, lengths=[3])
        session.send(
            service_pb2.SessionRequest(
                request_id="lost",
                model_id="run-does-not-exist",
                forward=forward_backward_input(data, "cross_entropy", None),
            )
        )
        response = session.receive()
        session.send(service_pb2.SessionRequest(request_id="", create_model=training_pb2.CreateModelRequest()))
        missing_id = session.receive()
    finally:
        session.close()
    assert response.request_id == "lost" and response.HasField("result")
    assert response.result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "model_id 'run-does-not-exist'" in response.result.error.message
    assert missing_id.result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request_id" in missing_id.result.error.message


@pytest.mark.parametrize("answered_in_batches", [False, True])
def test_a_batch_of_requests_is_handled_as_if_each_came_alone(server, answered_in_batches):
    session = RawSession(server.address, batches=answered_in_batches)
    data = ragged_batch(seed=0, lengths=[3])
    requests = [
        create_model_request("a", seed=1),
        service_pb2.SessionRequest(
            request_id="lost", model_id="no-such-run", forward=forward_backward_input(data, "cross_entropy", None)
        ),
        create_model_request("b", seed=2),
        service_pb2.SessionRequest(request_id="nested", batch=service_pb2.SessionRequests()),
    ]
    messages, responses = 0, []
    try:
        session.send(service_pb2.SessionRequest(batch=service_pb2.SessionRequests(requests=requests)))
        while len(responses) < 6:  # acks of a and b; results of all four
            message = session.receive()
            batch = message.WhichOneof("response") == "batch"
            responses += message.batch.responses if batch else [message]
            messages += 1
    finally:
        session.close()
    acks = {r.request_id: r.ack for r in responses if r.HasField("ack")}
    results = {r.request_id: r.result for r in responses if r.HasField("result")}
    assert sorted(acks) == ["a", "b"] and acks["a"].seq == acks["b"].seq == 1  # two runs, each its first request
    assert results["a"].create_model.model_id != results["b"].create_model.model_id
    assert results["lost"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results["nested"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert results["nested"].error.message.startswith("batch: a batch inside a batch")
    # Both acks and both refusals were queued together: one message where the client asked for batches.
    assert (messages < len(responses)) == answered_in_batches


def test_a_batch_takes_what_is_queued_in_order_within_its_budget_framing_included():
    def request(size: int) -> service_pb2.SessionRequest:
        return service_pb2.SessionRequest(request_id="x" * size)

    async def batches(sizes: list[int], budget: int) -> list[list[int]]:
        queue: asyncio.Queue = asyncio.Queue()
        for size in sizes[1:]:
            queue.put_nowait(request(size))
        queue.put_nowait(None)  # the stream's end
        taken, held_back, first = [], [], request(sizes[0])
        while first is not None:
            taken.append([len(r.request_id) for r in take_queued(first, queue, budget, held_back)])
            first = held_back.pop() if held_back else await queue.get()
        return taken

    budget = 1000
    assert request(100).ByteSize() + ENTRY_FRAMING_BYTES == 118  # so 8 fit in 1000 bytes, not 9
    assert [len(batch) for batch in asyncio.run(batches([100] * 20, budget))] == [8, 8, 4]
    assert asyncio.run(batches([100, 5000, 100, 100], budget)) == [[100], [5000], [100, 100]]  # too large: alone


def test_async_double_await_acks_then_completes_in_submission_order(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
    data = ragged_batch(seed=1, lengths=[9])

    async def run() -> tuple[list[float], list[float]]:
        backward = await training.forward_backward_async(data, "cross_entropy")  # acked: ordered now
        step = await training.optim_step_async(types.AdamParams(learning_rate=0.05))
        forward = await training.forward_async(data, "cross_entropy")
        with pytest.raises(BadRequestError, match="loss_fn"):
            await training.forward_async(data, "not-a-loss")  # rejected at the first await
        first, _, second = await asyncio.gather(backward, step, forward.result_async(timeout=60))
        return first.loss_fn_outputs[0]["logprobs"].tolist(), second.loss_fn_outputs[0]["logprobs"].tolist()

    before, after = asyncio.run(run())
    assert not np.allclose(before, after, atol=1e-3)


def test_sync_calls_return_futures_at_once_and_keep_their_order(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
    data = ragged_batch(seed=1, lengths=[9])
    first = training.forward(data, "cross_entropy")
    training.forward_backward(data, "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=0.05))
    last = training.forward(data, "cross_entropy")
    before = first.result(timeout=60).loss_fn_outputs[0]["logprobs"].to_numpy()
    after = last.result(timeout=60).loss_fn_outputs[0]["logprobs"].to_numpy()
    assert after.sum() > before.sum()  # one step of descent on these very tokens


def test_unknown_model_is_not_found_through_the_sdk(service):
    from tinker_client.training_client import TrainingClient

    info = types.GetInfoResponse(model_data=types.ModelData(model_name=BASE_MODEL), model_id="run-ghost")
    ghost = TrainingClient(service._connection, info)
    with pytest.raises(NotFoundError, match="run-ghost"):
        ghost.forward(ragged_batch(seed=0, lengths=[2]), "cross_entropy").result(timeout=30)


def test_a_resent_request_is_answered_by_the_original_and_never_runs_twice(server, service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=7).result()
    step = service_pb2.SessionRequest(
        request_id="s",
        model_id=training.model_id,
        idempotency_key="step-1",
        optim_step=training_pb2.OptimStepRequest(adam_params=adam_params(types.AdamParams(learning_rate=0.1))),
    )
    answers = []
    for _ in range(2):  # the same request on two streams, as after a reconnect
        session = RawSession(server.address)
        session.send(step)
        answers.append((session.receive(), session.receive()))
        session.close()
    (first_ack, first_result), (second_ack, second_result) = answers
    assert first_ack.ack == second_ack.ack  # same future_id, same seq
    assert first_result.result == second_result.result
    session = RawSession(server.address)
    session.send(
        service_pb2.SessionRequest(
            request_id="n",
            model_id=training.model_id,
            idempotency_key="step-2",
            optim_step=training_pb2.OptimStepRequest(adam_params=adam_params(types.AdamParams(learning_rate=0.1))),
        )
    )
    assert session.receive().ack.seq == first_ack.ack.seq + 1  # the resend took no place in the order
    session.close()
