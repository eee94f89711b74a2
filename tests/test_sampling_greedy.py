"""Greedy sampling in the worker equals step-by-step argmax with plain torch (and peft)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinker_client import types
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import peft_model, ragged_batch, sampler_dir


def argmax_continuation(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    tokens, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            token = int(torch.argmax(logits))
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            tokens.append(token)
    return tokens[len(prompt) :], logprobs


@pytest.mark.parametrize("trained", [False, True])
def test_greedy_sample_equals_plain_torch_argmax(service, server, trained):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=4)
    if trained:
        for _ in range(5):
            training.forward_backward(ragged_batch(seed=8, lengths=[16]), "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2))
    sampler = training.save_weights_and_get_sampling_client()
    prompts = [[256, 72, 105], [256, 65, 66, 67, 68, 69, 70]]  # ragged: left padding in one batch
    params = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
    futures = [sampler.sample(types.ModelInput.from_ints(prompt), 2, params) for prompt in prompts]

    reference = peft_model(sampler_dir(server.data_dir, sampler.model_path)) if trained else build_embedded_model()
    for prompt, future in zip(prompts, futures, strict=True):
        expected_tokens, expected_logprobs = argmax_continuation(reference, prompt, 12)
        for sequence in future.result(timeout=60).sequences:
            assert sequence.tokens == expected_tokens
            assert sequence.stop_reason == "length"
            np.testing.assert_allclose(sequence.logprobs, expected_logprobs, atol=1e-4)
