"""forward_backward and optim_step against plain torch, peft and torch.optim.AdamW."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from tinker_client import types
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import (
    adapter_tensors,
    peft_model,
    ragged_batch,
    reference_cross_entropy,
    reference_logprobs,
    sampler_dir,
)


def test_forward_backward_logprobs_and_loss_equal_plain_torch(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=3).result()
    data = ragged_batch(seed=0, lengths=[5, 17, 9])

    output = training.forward_backward(data, "cross_entropy").result()

    model = build_embedded_model()  # a fresh adapter has B = 0: the bare base model
    with torch.no_grad():
        for datum, outputs in zip(data, output.loss_fn_outputs, strict=True):
            expected = reference_logprobs(model, datum).numpy()
            np.testing.assert_allclose(outputs["logprobs"].to_numpy(), expected, atol=1e-4)
            weights = datum.loss_fn_inputs["weights"].to_numpy()
            np.testing.assert_allclose(outputs["elementwise_loss"].to_numpy(), -weights * expected, atol=1e-4)
        expected_loss = float(reference_cross_entropy(model, data))
    assert output.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)


def test_optim_step_equals_torch_adamw_on_a_peft_model(service, server):
    # Adam divides by sqrt(v): where a gradient is ~0 its sign is float noise, and an eps far
    # below the gradients' scale turns that noise into a full step. eps=1e-5 keeps the check
    # about the optimizer, not about the last bit of a padded vs an unpadded matmul.
    training = service.create_lora_training_client(BASE_MODEL, rank=4, seed=7).result()
    initial = training.save_weights_for_sampler("initial").result().path
    data = ragged_batch(seed=1, lengths=[6, 11])
    adam = types.AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.99, eps=1e-5, weight_decay=0.1, grad_clip_norm=0.5)
    grad_norms = []
    for _ in range(3):
        training.forward_backward(data, "cross_entropy")
        grad_norms.append(training.optim_step(adam).result().metrics["grad_norm"])
    final = training.save_weights_for_sampler("after-3-steps").result().path

    reference = peft_model(sampler_dir(server.data_dir, initial), trainable=True)
    params = [param for param in reference.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
    )
    for step in range(3):
        optimizer.zero_grad()
        reference_cross_entropy(reference, data).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
        assert grad_norms[step] == pytest.approx(float(norm), rel=1e-4)
        optimizer.step()

    expected = get_peft_model_state_dict(reference, save_embedding_layers=False)
    actual = adapter_tensors(sampler_dir(server.data_dir, final))
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_gradients_accumulate_until_the_step(service, server):
    """Two forward_backward calls on halves then one step = one call on the whole batch."""
    data = ragged_batch(seed=2, lengths=[4, 7, 5, 8])
    adam = types.AdamParams(learning_rate=1e-2)
    split = service.create_lora_training_client(BASE_MODEL, rank=4, seed=11).result()
    split.forward_backward(data[:2], "cross_entropy")
    split.forward_backward(data[2:], "cross_entropy")
    split.optim_step(adam)
    whole = service.create_lora_training_client(BASE_MODEL, rank=4, seed=11).result()
    whole.forward_backward(data, "cross_entropy")
    whole.optim_step(adam)

    split_path = split.save_weights_for_sampler("s").result().path
    whole_path = whole.save_weights_for_sampler("w").result().path
    split_tensors = adapter_tensors(sampler_dir(server.data_dir, split_path))
    for key, value in adapter_tensors(sampler_dir(server.data_dir, whole_path)).items():
        torch.testing.assert_close(split_tensors[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_training_lowers_the_loss(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=0).result()
    data = ragged_batch(seed=4, lengths=[12, 12])
    losses = []
    for _ in range(15):
        losses.append(training.forward_backward(data, "cross_entropy").result().metrics["loss:sum"])
        training.optim_step(types.AdamParams(learning_rate=3e-3))
    assert losses[-1] < 0.5 * losses[0]
