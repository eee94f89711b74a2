"""Tinker 0.38's behaviours, beyond its signatures: futures of clients, pipelined custom losses,
sessions, checkpoint management, and clear refusals of what a self-hosted server does not do."""

from __future__ import annotations

import asyncio
import time
import warnings

import numpy as np
import pytest
import torch

from tinker_client import (
    APIConnectionError,
    APIFuture,
    BadRequestError,
    RequestFailedError,
    ServiceClient,
    TrainingClient,
    UnsupportedFeatureError,
    types,
)

from .conftest import BASE_MODEL
from .helpers import adapter_tensors, ragged_batch, sampler_dir

DATA = ragged_batch(seed=31, lengths=[7, 5])
ADAM = types.AdamParams(learning_rate=1e-2)


def test_a_client_creating_method_returns_a_future_that_still_works_as_the_client(service):
    future = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3)
    assert isinstance(future, APIFuture) and isinstance(future, TrainingClient)
    training = future.result()
    assert type(training) is TrainingClient
    with pytest.warns(FutureWarning, match=r"call \.result\(\) on it"):
        assert future.model_id == training.model_id
    with pytest.warns(FutureWarning, match=r"\.forward"):
        used_directly = future.forward(DATA, "cross_entropy").result()
    assert used_directly.metrics == training.forward(DATA, "cross_entropy").result().metrics

    async def in_async_code() -> TrainingClient:
        return await service.create_lora_training_client(BASE_MODEL, rank=4, seed=3)

    assert type(asyncio.run(in_async_code())) is TrainingClient


def test_get_info_answers_from_the_client_with_the_seed_the_server_used(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4).result()
    info = training.get_info()
    assert info.model_id == training.model_id and info.lora_rank == 4
    assert info.model_data.model_name == BASE_MODEL and info.optimizer_config == types.AdamOptimizerConfig()
    twin = service.create_lora_training_client(BASE_MODEL, rank=4, seed=info.lora_config.seed).result()
    assert (
        twin.forward(DATA, "cross_entropy").result().metrics == training.forward(DATA, "cross_entropy").result().metrics
    )


def _sum_of_squares(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    time.sleep(0.3)  # a slow client-side loss: the call must not wait for it
    return sum((lp**2).sum() for lp in logprobs), {"custom/squares:sum": 1.0}


def test_forward_backward_custom_returns_at_once_and_later_requests_run_after_its_backward(server, service):
    pipelined = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
    started = time.perf_counter()
    custom = pipelined.forward_backward_custom(DATA, _sum_of_squares)
    step = pipelined.optim_step(ADAM)  # submitted while the loss is still being evaluated here
    assert time.perf_counter() - started < 0.25
    pipelined_loss = custom.result().metrics["loss:sum"]
    step.result()

    sequential = service.create_lora_training_client(BASE_MODEL, rank=4, seed=5).result()
    sequential_loss = sequential.forward_backward_custom(DATA, _sum_of_squares).result().metrics["loss:sum"]
    sequential.optim_step(ADAM).result()
    assert pipelined_loss == sequential_loss
    weights = [
        adapter_tensors(sampler_dir(server.data_dir, run.save_weights_for_sampler("after").result().path))
        for run in (pipelined, sequential)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_failing_custom_loss_fails_the_requests_made_behind_it_and_nothing_else(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=6).result()

    def broken(data, logprobs):
        time.sleep(0.2)
        raise ValueError("my loss is broken")

    custom = training.forward_backward_custom(DATA, broken)
    queued_behind = training.optim_step(ADAM)
    with pytest.raises(ValueError, match="my loss is broken"):
        custom.result()
    with pytest.raises(ValueError, match="my loss is broken"):
        queued_behind.result()
    assert training.forward(DATA, "cross_entropy").result().metrics["loss:sum"] > 0  # made afterwards: runs


def test_a_custom_loss_handle_gives_the_same_gradient_as_the_callable_it_traces(server, service):
    def per_datum(logprobs: torch.Tensor, weights: torch.Tensor):
        loss = -(logprobs * weights).sum()  # also a metric, still tracking gradients (as Tinker's docs do)
        return loss, {"custom/tokens:sum": torch.tensor(1.0), "custom/loss:sum": loss}

    handle = service.create_custom_loss(per_datum, {"logprobs": 1, "weights": 1}).result()
    assert handle.input_names == ("weights",) and handle.loss_id is None

    def batch_loss(data, logprobs):
        return sum(
            -(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs, strict=True)
        ), {}

    outputs, weights = [], []
    for loss in (handle, batch_loss):
        training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=7).result()
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no "tensor with requires_grad=True to a scalar"
            outputs.append(training.forward_backward_custom(DATA, loss).result())
        training.optim_step(ADAM).result()
        weights.append(
            adapter_tensors(sampler_dir(server.data_dir, training.save_weights_for_sampler("w").result().path))
        )
    assert outputs[0].metrics["loss:sum"] == pytest.approx(outputs[1].metrics["loss:sum"], rel=1e-6)
    assert outputs[0].metrics["custom/tokens:sum"] == len(DATA)
    assert outputs[0].metrics["custom/loss:sum"] == pytest.approx(outputs[0].metrics["loss:sum"], rel=1e-6)
    assert all(torch.allclose(weights[0][key], weights[1][key], atol=1e-7) for key in weights[0])
    with pytest.raises(ValueError, match="target_distribution"):
        service.create_custom_loss(lambda logprobs, target_distribution: (logprobs.sum(), {}), {"logprobs": 1})


def test_a_session_labels_its_runs_and_lists_what_it_made(server):
    with ServiceClient(
        base_url=server.address, user_metadata={"team": "search"}, project_id="p-compat", display_name="compat"
    ) as service:
        training = service.create_lora_training_client(BASE_MODEL, rank=4, user_metadata={"try": "1"}).result()
        sampler = training.save_weights_and_get_sampling_client().result()
        rest = service.create_rest_client()
        run = rest.get_training_run(training.model_id).result()
        assert run.user_metadata == {"team": "search", "try": "1"} and run.project_id == "p-compat"
        session = rest.get_session(run.session_id).result()
        assert session.training_run_ids == [training.model_id] and session.sampler_ids == [sampler.sampler_id]
        assert session.display_name == "compat" and session.user_metadata == {"team": "search"}
        assert run.session_id in rest.list_sessions().result().sessions
        assert rest.get_sampler(sampler.sampler_id).result().model_path == sampler.model_path
        in_project = rest.list_training_runs(project_id="p-compat").result().training_runs
        assert [r.training_run_id for r in in_project] == [training.model_id]
        rest.assign_session_project(run.session_id, "p-moved").result()
        assert rest.get_training_run(training.model_id).result().project_id == "p-moved"


def test_checkpoints_can_be_listed_timed_out_described_and_copied(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=8, train_unembed=False).result()
    state = training.save_state("kept", user_metadata={"stage": "warmup"}).result().path
    rest = service.create_rest_client()
    mine = {
        checkpoint.tinker_path: checkpoint for checkpoint in rest.list_user_checkpoints(limit=1000).result().checkpoints
    }
    assert mine[state].user_metadata == {"stage": "warmup"} and mine[state].expires_at is None
    rest.set_checkpoint_ttl_from_tinker_path(state, 3600).result()
    expiry = rest.list_checkpoints(training.model_id).result().checkpoints[0].expires_at
    assert expiry is not None and 3500 < expiry.timestamp() - time.time() <= 3600
    rest.set_checkpoint_ttl_from_tinker_path(state, None).result()
    assert rest.list_checkpoints(training.model_id).result().checkpoints[0].expires_at is None
    info = rest.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.lora_rank, info.train_unembed, info.train_mlp) == (BASE_MODEL, 4, False, True)
    copy = rest.copy_weights(state).result()
    assert copy.endswith("/weights/kept") and copy != state
    resumed = service.create_training_client_from_state_with_optimizer(copy).result()
    expected = training.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
    assert resumed.forward(DATA, "cross_entropy").result().metrics["loss:sum"] == expected


@pytest.mark.parametrize(
    ("attempt", "message"),
    [
        (lambda s, t: s.create_training_client_from_state("tinker://x/weights/y", weights_access_token="t"), "publish"),
        (lambda s, t: t.load_state("tinker://x/weights/y", weights_access_token="t"), "publish"),
        (lambda s, t: s.create_sampling_client(base_model=BASE_MODEL, retry_config=object()), "reconnects"),
        (lambda s, t: s.get_console_url(), "web console is off; start tinker-server with --console-port"),
        (lambda s, t: t.get_console_url(), "web console is off"),
        (lambda s, t: s.create_rest_client().get_billing_usage("2026-01-01", "2026-02-01"), "hosted"),
    ],
)
def test_what_a_self_hosted_server_does_not_do_fails_at_once_saying_so(service, attempt, message):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    with pytest.raises(UnsupportedFeatureError, match=message):
        attempt(service, training)


def test_options_the_server_cannot_honour_are_refused_naming_them(server, service):
    with pytest.raises(BadRequestError, match=r"create_model\.optimizer\.type: 'dimuon'"):
        service.create_lora_training_client(BASE_MODEL, rank=4, optimizer=types.DimuonOptimizerConfig()).result()
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    with pytest.raises(BadRequestError, match=r"loss_fn_config_strings\['reduction'\]"):
        training.forward(DATA, "ppo", {"reduction": "mean", "clip_low_threshold": 0.9}).result()
    with pytest.raises(TypeError, match="timeout"):
        ServiceClient(base_url=server.address, timeout=5)
    image = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.ImageChunk(b"...", "png", 4)])
    datum = types.Datum(model_input=image, loss_fn_inputs={"target_tokens": np.arange(6)})
    with pytest.raises(BadRequestError, match=r"data\[0\]\.model_input\.chunks\[1\]: an image chunk"):
        training.forward([datum], "cross_entropy").result()


def test_a_request_that_failed_after_its_ack_is_also_a_request_failed_error(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=1).result()
    state = training.save_state("bigger").result().path
    small = service.create_lora_training_client(BASE_MODEL, rank=2, seed=1).result()
    with pytest.raises(BadRequestError) as refused:  # validated, acked, then failed in the worker
        small.load_state(state).result()
    assert isinstance(refused.value, RequestFailedError) and refused.value.status_code == 400
    with pytest.raises(BadRequestError) as rejected:  # rejected before it was queued
        small.forward(DATA, "no-such-loss").result()
    assert not isinstance(rejected.value, RequestFailedError)


def test_a_closed_client_closes_again_quietly_and_says_it_is_closed(server):
    """Closing twice (close() inside a `with` block) is a no-op; a call after it is the SDK's
    connection error, not gRPC's "Channel is closed"."""
    with ServiceClient(base_url=server.address) as service:
        service.create_sampling_client(base_model=BASE_MODEL).result()
        service.close()
    with pytest.raises(APIConnectionError, match="this client was closed"):
        service.get_server_capabilities()
    with pytest.raises(APIConnectionError, match="this client was closed"):
        service.create_sampling_client(base_model=BASE_MODEL).result(timeout=30)
