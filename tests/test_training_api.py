"""The rest of the training API: RL loops, custom losses, large batches, the method surface."""

from __future__ import annotations

import asyncio
import inspect
import time

import numpy as np
import pytest
import torch
from server_process import running_server

from tinker_client import APIConnectionError, BadRequestError, ServiceClient, TrainingClient, types

from .conftest import BASE_MODEL
from .helpers import ragged_batch, read_gradients

PROMPT = [256, 81, 58, 32]  # "<bos>Q: "


def sequence_datum(completion: list[int], sampler_logprobs: np.ndarray, advantage: float) -> types.Datum:
    tokens = PROMPT + completion
    mask = np.array([0.0] * (len(PROMPT) - 1) + [1.0] * len(completion), dtype=np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(tokens[1:]),
            "logprobs": sampler_logprobs.astype(np.float32),
            "advantages": (mask * advantage).astype(np.float32),
        },
    )


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_a_sample_free_rl_loop_makes_advantaged_sequences_likelier(service, loss_fn):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=0).result()
    good, bad = [89, 101, 115], [78, 111, 33]  # "Yes" is rewarded, "No!" is not
    completion_mask = np.array([0.0] * (len(PROMPT) - 1) + [1.0] * 3)

    def sequence_logprob(output) -> float:
        return float((output["logprobs"].to_numpy() * completion_mask).sum())

    history = []
    for _ in range(8):
        probe = [sequence_datum(seq, np.zeros(len(PROMPT) + 2), 0.0) for seq in (good, bad)]
        current = training.forward(probe, "importance_sampling").result().loss_fn_outputs
        history.append([sequence_logprob(output) for output in current])
        # The "sampler" is the current policy: its logprobs come from this very forward.
        batch = [
            sequence_datum(seq, output["logprobs"].to_numpy(), advantage)
            for seq, output, advantage in zip((good, bad), current, (1.0, -1.0), strict=True)
        ]
        training.forward_backward(batch, loss_fn)
        training.optim_step(types.AdamParams(learning_rate=5e-3))
    (good_start, bad_start), (good_end, bad_end) = history[0], history[-1]
    assert good_end > good_start + 1.0
    assert bad_end < bad_start - 1.0


def test_custom_loss_gives_the_same_gradient_as_the_built_in_loss(service, server):
    """importance_sampling written by hand and sent through forward_backward_custom."""
    rng = np.random.default_rng(3)
    data = []
    for datum in ragged_batch(7, [6, 9]):
        length = datum.model_input.length
        data.append(
            types.Datum(
                model_input=datum.model_input,
                loss_fn_inputs={
                    "target_tokens": datum.loss_fn_inputs["target_tokens"],
                    "logprobs": rng.uniform(-6, -5, size=length).astype(np.float32),
                    "advantages": rng.normal(size=length).astype(np.float32),
                },
            )
        )

    def my_importance_sampling(batch, logprobs_list):
        loss = sum(
            -(torch.exp(lp - d.loss_fn_inputs["logprobs"].to_torch()) * d.loss_fn_inputs["advantages"].to_torch()).sum()
            for d, lp in zip(batch, logprobs_list, strict=True)
        )
        return loss, {"custom_metric": 42.0}

    built_in = service.create_lora_training_client(BASE_MODEL, rank=4, seed=8).result()
    custom = service.create_lora_training_client(BASE_MODEL, rank=4, seed=8).result()
    for training in (built_in, custom):  # warm up: non-zero B everywhere
        training.forward_backward(ragged_batch(1, [8]), "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2))

    expected = built_in.forward_backward(data, "importance_sampling").result()
    result = custom.forward_backward_custom(data, my_importance_sampling).result()
    assert result.metrics["custom_metric"] == 42.0
    assert result.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    for mine, theirs in zip(result.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(mine["logprobs"].to_numpy(), theirs["logprobs"].to_numpy(), atol=1e-6)

    _, built_in_gradients = read_gradients(built_in, server.data_dir, "builtin")
    _, custom_gradients = read_gradients(custom, server.data_dir, "custom")
    for key, gradient in built_in_gradients.items():
        torch.testing.assert_close(custom_gradients[key], gradient, rtol=1e-4, atol=1e-5, msg=key)


def test_custom_loss_async_form(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=8).result()
    data = ragged_batch(2, [5])

    def nll(batch, logprobs_list):
        return -sum(lp.sum() for lp in logprobs_list), {}

    import asyncio

    async def run():
        future = await training.forward_backward_custom_async(data, nll)
        return await future

    output = asyncio.run(run())
    expected = -training.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy().sum()
    assert output.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5)


def test_a_batch_larger_than_one_message_is_split_and_merged_in_order(tmp_path, service):
    data = ragged_batch(5, [300, 40, 250, 7, 260, 90])
    reference = service.create_lora_training_client(BASE_MODEL, rank=4, seed=6).result()
    expected = reference.forward_backward(data, "cross_entropy").result()
    # The default server takes it in one message; this one accepts at most 8 KiB.
    with running_server(tmp_path, ["--max-message-bytes", "8192"]) as address:
        small = ServiceClient(base_url=address)
        training = small.create_lora_training_client(BASE_MODEL, rank=4, seed=6).result()
        assert len(training._forward_requests("forward_backward", data, "cross_entropy", None)) >= 2
        output = training.forward_backward(data, "cross_entropy").result()
        stepped = training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        small.close()
    reference_step = reference.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    assert output.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)
    for mine, theirs in zip(output.loss_fn_outputs, expected.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(mine["logprobs"].to_numpy(), theirs["logprobs"].to_numpy(), atol=1e-5)
    # Gradients of all chunks accumulated into one step: the same norm as the whole batch.
    assert stepped.metrics["grad_norm"] == pytest.approx(reference_step.metrics["grad_norm"], rel=1e-4)


def test_a_session_that_ends_well_waits_for_the_answers_to_what_it_sent(server, service):
    data = ragged_batch(11, [48, 64, 80])
    closing = ServiceClient(base_url=server.address)
    training = closing.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result()
    futures = [training.forward_backward(data, "cross_entropy") for _ in range(6)]
    closing.close()  # none of them was waited for
    reference = service.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result()
    expected = reference.forward_backward(data, "cross_entropy").result().metrics["loss:sum"]
    # Answered, every one: no optim_step between them, so each saw the same weights.
    assert [future.result().metrics["loss:sum"] for future in futures] == pytest.approx([expected] * 6, rel=1e-5)


def test_a_session_that_ends_well_waits_for_a_custom_losss_backward_and_what_waits_behind_it(server):
    """The backward is made only once the forward's logprobs are back, and the step waits behind
    it in the client: closing must wait for both, or the gradient would never be applied."""
    closing = ServiceClient(base_url=server.address)
    training = closing.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result()

    def nll(data, logprobs_list):
        return -sum(logprobs.sum() for logprobs in logprobs_list), {}

    custom = training.forward_backward_custom(ragged_batch(13, [16, 24]), nll)
    step = training.optim_step(types.AdamParams(learning_rate=1e-3))
    closing.close()
    assert custom.result().metrics["loss:sum"] > 0
    assert step.result().metrics["grad_norm"] > 0  # the step saw the backward's gradient


def test_an_interrupted_session_closes_without_waiting_and_its_run_takes_nothing_more(server):
    data = ragged_batch(12, [128] * 8)
    closing = ServiceClient(base_url=server.address)
    training = closing.create_lora_training_client(BASE_MODEL, rank=4, seed=9).result()

    async def queued() -> list:  # each await returns at the request's ack: all 16 are queued on the server
        return [await training.forward_backward_async(data, "cross_entropy") for _ in range(16)]

    futures = asyncio.run(queued())
    started = time.perf_counter()
    closing.close("interrupted")  # the server runs them (over a second here), then unloads the run
    assert time.perf_counter() - started < 0.5
    unanswered = 0
    for future in futures:
        try:
            future.result(timeout=0)
        except APIConnectionError as error:
            assert "this client was closed" in str(error)
            unanswered += 1
    assert unanswered >= 8, unanswered
    with ServiceClient(base_url=server.address) as again:
        closed = TrainingClient(again._connection, training.get_info())
        with pytest.raises(BadRequestError, match="its session was closed"):
            closed.forward(data, "cross_entropy").result()


# The Tinker SDK's TrainingClient methods (tinker 0.38) and their leading argument names.
TINKER_TRAINING_METHODS = {
    "forward": ["data", "loss_fn", "loss_fn_config"],
    "forward_backward": ["data", "loss_fn", "loss_fn_config"],
    "forward_backward_custom": ["data", "loss_fn"],
    "optim_step": ["optim_params", "adam_params"],
    "save_weights_for_sampler": ["name"],
    "save_weights_and_get_sampling_client": ["name"],
    "get_info": [],
}


@pytest.mark.parametrize("method", sorted(TINKER_TRAINING_METHODS))
def test_training_client_has_sync_and_async_forms_with_tinker_argument_names(method):
    expected = TINKER_TRAINING_METHODS[method]
    for name in (method, f"{method}_async"):
        function = getattr(TrainingClient, name)
        assert inspect.iscoroutinefunction(function) == name.endswith("_async")
        parameters = list(inspect.signature(function).parameters)[1:]
        assert parameters[: len(expected)] == expected, name
