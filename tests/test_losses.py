"""Every built-in loss: loss, per-token logprobs and adapter gradients against plain torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinker_client import BadRequestError, types
from tinker_rpc.v1 import sampling_pb2, training_pb2
from tinker_wire.tensor_codec import decode_array, encode_array

from .conftest import BASE_MODEL
from .helpers import (
    RawSession,
    create_run,
    peft_gradients,
    peft_model,
    provenance_datum,
    ragged_batch,
    read_gradients,
    read_gradients_raw,
    record_sample,
)
from .reference_losses import REFERENCE_LOSSES

LENGTHS = [5, 12, 8]


def rl_batch(seed: int, loss_fn: str) -> list[types.Datum]:
    """Ragged datums with every input a loss may need; sampler logprobs spread so clipping bites."""
    rng = np.random.default_rng(seed)
    data = []
    for datum in ragged_batch(seed, LENGTHS):
        length = datum.model_input.length
        inputs = {"target_tokens": datum.loss_fn_inputs["target_tokens"]}
        if loss_fn == "cross_entropy":
            inputs["weights"] = datum.loss_fn_inputs["weights"]
        else:
            inputs["logprobs"] = rng.uniform(-7.0, -4.0, size=length).astype(np.float32)
            inputs["advantages"] = rng.normal(size=length).astype(np.float32)
        if loss_fn == "gspo":
            inputs["sequence_ratio_mask"] = (rng.uniform(size=length) < 0.7).astype(np.float32)
        data.append(types.Datum(model_input=datum.model_input, loss_fn_inputs=inputs))
    return data


def warmed_up_client(service):
    """A run whose B matrices are non-zero, so every LoRA weight gets a gradient."""
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=21).result()
    training.forward_backward(ragged_batch(99, [10]), "cross_entropy")
    training.optim_step(types.AdamParams(learning_rate=2e-2))
    return training


CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
    ("cispo", {}),
    ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}),
    ("dro", {"beta": 0.3}),
    ("gspo", {}),
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.1}),
]


@pytest.mark.parametrize(("loss_fn", "config"), CASES, ids=[f"{name}-{cfg}" for name, cfg in CASES])
def test_loss_logprobs_and_gradients_equal_the_torch_reference(service, server, loss_fn, config):
    training = warmed_up_client(service)
    data = rl_batch(seed=len(config), loss_fn=loss_fn)
    output = training.forward_backward(data, loss_fn, config).result()
    adapter_dir, server_gradients = read_gradients(training, server.data_dir, f"{loss_fn}-{len(config)}")

    reference = peft_model(adapter_dir, trainable=True)
    reference_fn = REFERENCE_LOSSES[loss_fn]
    total = torch.zeros(())
    for datum, outputs in zip(data, output.loss_fn_outputs, strict=True):
        tokens = torch.tensor(datum.model_input.to_ints())[None]
        inputs = {key: value.to_torch() for key, value in datum.loss_fn_inputs.items()}
        targets = inputs.pop("target_tokens").long()
        lp = torch.log_softmax(reference(input_ids=tokens).logits[0].float(), -1).gather(-1, targets[:, None])[:, 0]
        per_token = reference_fn(lp, inputs, config)
        np.testing.assert_allclose(outputs["logprobs"].to_numpy(), lp.detach().numpy(), atol=1e-4)
        np.testing.assert_allclose(outputs["elementwise_loss"].to_numpy(), per_token.detach().numpy(), atol=1e-4)
        total = total + per_token.sum()
    assert output.metrics["loss:sum"] == pytest.approx(float(total.detach()), rel=1e-4, abs=1e-4)

    total.backward()
    assert_gradients_equal(server_gradients, reference)


def assert_gradients_equal(server_gradients: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    expected = peft_gradients(reference)
    assert sorted(server_gradients) == sorted(expected)
    for key, gradient in expected.items():
        torch.testing.assert_close(server_gradients[key], gradient, rtol=1e-4, atol=1e-4, msg=key)


STABLE_REINFORCE_PROMPT = [256, 72, 105, 33, 32]


def warmed_up_run(session: RawSession) -> str:
    """warmed_up_client over the raw protocol: a run whose B matrices are non-zero."""
    model_id = create_run(session, seed=21)
    tokens = np.random.default_rng(99).integers(0, 256, size=11)
    datum = training_pb2.Datum(
        model_input=training_pb2.ModelInput(tokens=encode_array(tokens[:-1])),
        loss_fn_inputs={"target_tokens": encode_array(tokens[1:])},
    )
    session.call(
        model_id=model_id, forward_backward=training_pb2.ForwardBackwardInput(loss_fn="cross_entropy", data=[datum])
    )
    adam = training_pb2.AdamParams(learning_rate=2e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    session.call(model_id=model_id, optim_step=training_pb2.OptimStepRequest(adam_params=adam))
    return model_id


def stable_reinforce_batch(sample: sampling_pb2.SampleResult) -> list[training_pb2.Datum]:
    """A datum per sequence, with random advantages and deliberately wrong client `logprobs`."""
    rng = np.random.default_rng(5)
    data = []
    for sequence in sample.sequences:
        length = len(STABLE_REINFORCE_PROMPT) + len(decode_array(sequence.tokens)) - 1
        advantages = rng.normal(size=length).astype(np.float32)
        wrong = np.full(length, -9.0, np.float32)
        data.append(provenance_datum(STABLE_REINFORCE_PROMPT, sequence, advantages=advantages, logprobs=wrong))
    return data


def tensor(data) -> torch.Tensor:
    return torch.from_numpy(decode_array(data).copy())


@pytest.mark.parametrize("config", [{}, {"max_importance_weight": 1.0, "kl_coeff": 0.5}], ids=["defaults", "capped+kl"])
def test_stable_reinforce_equals_the_torch_reference_with_the_recorded_sampler_logprobs(server, config):
    """The sampler is the bare base model and the trainer a warmed-up adapter, so the
    importance weights spread around 1. The client's `logprobs` are wrong on purpose."""
    session = RawSession(server.address)
    try:
        model_id = warmed_up_run(session)
        sample = record_sample(session, STABLE_REINFORCE_PROMPT, num_samples=3, seed=len(config))
        data = stable_reinforce_batch(sample)
        request = training_pb2.ForwardBackwardInput(loss_fn="stable_reinforce", data=data, loss_fn_config=config)
        result = session.call(model_id=model_id, forward_backward=request)
        assert not result.HasField("error"), result.error.message
        adapter_dir, server_gradients = read_gradients_raw(session, model_id, server.data_dir, "stable-reinforce")
    finally:
        session.close()

    reference = peft_model(adapter_dir, trainable=True)
    prompt_rows, cap = len(STABLE_REINFORCE_PROMPT) - 1, config.get("max_importance_weight", 2.0)
    total, weights = torch.zeros(()), []
    for datum, sequence, outputs in zip(data, sample.sequences, result.forward_backward.loss_fn_outputs, strict=True):
        logits = reference(input_ids=tensor(datum.model_input.tokens)[None]).logits[0].float()
        lp = torch.log_softmax(logits, -1).gather(-1, tensor(datum.loss_fn_inputs["target_tokens"])[:, None])[:, 0]
        recorded = torch.cat([torch.zeros(prompt_rows), tensor(sequence.logprobs)])
        inputs = {
            "advantages": tensor(datum.loss_fn_inputs["advantages"]),
            "sampler_logprobs": recorded,
            "sampled_mask": (torch.arange(len(lp)) >= prompt_rows).float(),
        }
        per_token = REFERENCE_LOSSES["stable_reinforce"](lp, inputs, config)
        elementwise = decode_array(outputs.tensors["elementwise_loss"])
        np.testing.assert_allclose(decode_array(outputs.tensors["logprobs"]), lp.detach().numpy(), atol=1e-4)
        np.testing.assert_allclose(elementwise, per_token.detach().numpy(), atol=1e-4)
        assert not elementwise[:prompt_rows].any()  # prompt positions contribute nothing
        with_clients_copy = REFERENCE_LOSSES["stable_reinforce"](
            lp, {**inputs, "sampler_logprobs": tensor(datum.loss_fn_inputs["logprobs"])}, config
        )
        assert not np.allclose(elementwise, with_clients_copy.detach().numpy(), atol=1e-2)
        weights.append((lp - recorded).detach().exp()[prompt_rows:])
        total = total + per_token.sum()
    weights = torch.cat(weights)
    if config:  # truncation bites: some weights are above the cap, some below
        assert (weights > cap).any() and (weights < cap).any()
    metrics = result.forward_backward.metrics
    assert metrics["loss:sum"] == pytest.approx(float(total.detach()), rel=1e-4, abs=1e-4)
    assert metrics["importance_weight:mean"] == pytest.approx(float(weights.clamp(max=cap).mean()), rel=1e-4)
    assert metrics["importance_weight:max"] == pytest.approx(float(weights.clamp(max=cap).max()), rel=1e-4)

    total.backward()
    assert_gradients_equal(server_gradients, reference)


def test_top_k_cross_entropy_takes_targets_and_weights_of_shape_n_by_k(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=6)
    targets = rng.integers(0, 256, size=(6, 3))
    weights = rng.uniform(size=(6, 3)).astype(np.float32)
    topk = types.Datum(
        model_input=types.ModelInput.from_ints(tokens.tolist()),
        loss_fn_inputs={"target_tokens": targets, "weights": weights},
    )
    columns = [
        types.Datum(
            model_input=types.ModelInput.from_ints(tokens.tolist()),
            loss_fn_inputs={"target_tokens": targets[:, k].copy(), "weights": weights[:, k].copy()},
        )
        for k in range(3)
    ]
    topk_output = training.forward([topk], "cross_entropy").result()
    column_outputs = training.forward(columns, "cross_entropy").result()
    logprobs = topk_output.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs.shape == (6, 3)
    for k, outputs in enumerate(column_outputs.loss_fn_outputs):
        np.testing.assert_allclose(logprobs[:, k], outputs["logprobs"].to_numpy(), atol=1e-6)
    assert topk_output.metrics["loss:sum"] == pytest.approx(column_outputs.metrics["loss:sum"], rel=1e-5)


@pytest.mark.parametrize(
    ("loss_fn", "inputs", "config", "message"),
    [
        ("ppo", ["target_tokens", "logprobs"], None, r"missing key\(s\) \['advantages'\] required by ppo"),
        (
            "importance_sampling",
            ["target_tokens", "logprobs", "advantages", "weights"],
            None,
            r"unknown key\(s\) \['weights'\]",
        ),
        (
            "dro",
            ["target_tokens", "logprobs", "advantages"],
            {"clip_low_threshold": 0.5},
            r"unknown key\(s\) \['clip_low_threshold'\] for dro",
        ),
        ("cispo", ["target_tokens", "logprobs", "advantages"], {"clip_high_threshold": float("inf")}, "not finite"),
        (
            "gspo",
            ["target_tokens", "logprobs", "advantages", "sequence_ratio_mask2"],
            None,
            r"unknown key\(s\) \['sequence_ratio_mask2'\]",
        ),
    ],
)
def test_loss_inputs_and_config_are_checked_per_loss(service, loss_fn, inputs, config, message):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    values = {
        "target_tokens": np.array([1, 2, 3]),
        "logprobs": np.full(3, -1.0, np.float32),
        "advantages": np.ones(3, np.float32),
        "weights": np.ones(3, np.float32),
        "sequence_ratio_mask2": np.ones(3, np.float32),
    }
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={key: values[key] for key in inputs}
    )
    with pytest.raises(BadRequestError, match=message):
        training.forward_backward([datum], loss_fn, config).result(timeout=30)


def test_policy_input_shape_must_match_the_tokens(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={
            "target_tokens": np.array([1, 2, 3]),
            "logprobs": np.full(3, -1.0, np.float32),
            "advantages": np.ones((3, 2), np.float32),
        },
    )
    with pytest.raises(BadRequestError, match=r"loss_fn_inputs\['advantages'\]: shape \[3, 2\]; expected \[N\]"):
        training.forward_backward([datum], "ppo").result(timeout=30)
