"""Sampling's extra outputs, over the raw protocol, against a plain torch forward of the base model
(sampled at temperature 0.7, so the model's own distribution differs from the sampled one):
top-k at generated positions, chosen prompt logprobs, draws at prompt positions, the last N
prompt logprobs, and a distinct id for every sequence."""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tinker_rpc.v1 import sampling_pb2, training_pb2
from tinker_server.worker.models import EMBEDDED_MODEL_NAME, build_embedded_model
from tinker_wire.tensor_codec import decode_array, encode_array

from .helpers import RawSession

PROMPT = [256, 72, 105, 33, 32, 104, 111]
INVALID_ARGUMENT = 3


@pytest.fixture(scope="module")
def session(server) -> Iterator[RawSession]:
    session = RawSession(server.address)
    yield session
    session.close()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_embedded_model()


def request(temperature: float = 0.7, seed: int = 11, **options) -> sampling_pb2.SampleRequest:
    return sampling_pb2.SampleRequest(
        base_model=EMBEDDED_MODEL_NAME,
        prompt=training_pb2.ModelInput(tokens=encode_array(np.array(PROMPT))),
        num_samples=2,
        sampling_params=sampling_pb2.SamplingParams(max_tokens=5, temperature=temperature, top_p=1.0, seed=seed),
        **options,
    )


def sample(session: RawSession, sample_request: sampling_pb2.SampleRequest) -> sampling_pb2.SampleResult:
    result = session.call(sample=sample_request)
    assert not result.HasField("error"), result.error.message
    return result.sample


def reference_logprobs(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: row i is the model's distribution over the token after tokens[:i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0].float(), -1)


def assert_top_k(tokens: np.ndarray, values: np.ndarray, expected: torch.Tensor) -> None:
    """Rows of k tokens with their logprobs are the rows of `expected`'s top k (ties in any order)."""
    top = torch.topk(expected, tokens.shape[1], dim=-1).values
    np.testing.assert_allclose(values, top.numpy(), atol=1e-4)
    np.testing.assert_allclose(values, expected.gather(-1, torch.tensor(tokens).long()).numpy(), atol=1e-4)


TARGETS = np.array([[72, -1, 0], [105, 5, -1], [-1, -1, -1], [32, 258, 1], [104, 3, 3], [111, -1, 200]])
LAST_N = 3


def test_sampling_extras_equal_plain_torch(session, model):
    options = dict(
        topk_sample_logprobs=4,
        target_prompt_logprobs=encode_array(TARGETS),
        prompt_alt_tokens_k=5,
        include_prompt_logprobs=True,
        topk_prompt_logprobs=2,
        prompt_logprobs_last_n=LAST_N,
    )
    result = sample(session, request(**options))
    prompt_logprobs = reference_logprobs(model, PROMPT)[:-1]  # row i: prompt token i + 1
    assert result.prompt_cache_hit_tokens == 0  # there is no prefix cache

    for sequence in result.sequences:
        tokens = decode_array(sequence.tokens).tolist()
        generated = reference_logprobs(model, PROMPT + tokens)[len(PROMPT) - 1 : -1]
        topk_tokens, topk_logprobs = decode_array(sequence.topk_tokens), decode_array(sequence.topk_logprobs)
        assert topk_tokens.shape == (len(tokens), 4)
        assert_top_k(topk_tokens, topk_logprobs, generated)

    expected_targets = torch.where(
        torch.from_numpy(TARGETS) >= 0, prompt_logprobs.gather(-1, torch.from_numpy(TARGETS).clamp(min=0)), 0.0
    )
    np.testing.assert_allclose(decode_array(result.target_prompt_logprobs), expected_targets.numpy(), atol=1e-4)

    alt_tokens = decode_array(result.prompt_alt_tokens)
    assert alt_tokens.shape == (len(PROMPT) - 1, 5)
    expected_alt = prompt_logprobs.gather(-1, torch.tensor(alt_tokens).long())
    np.testing.assert_allclose(decode_array(result.prompt_alt_logprobs), expected_alt.numpy(), atol=1e-4)
    again = sample(session, request(**options))
    other_seed = sample(session, request(seed=12, **options))
    np.testing.assert_array_equal(decode_array(again.prompt_alt_tokens), alt_tokens)
    assert not np.array_equal(decode_array(other_seed.prompt_alt_tokens), alt_tokens)

    scored = len(PROMPT) - LAST_N  # the first position scored
    logprobs = decode_array(result.prompt_logprobs)
    assert np.isnan(logprobs[:scored]).all()
    expected = prompt_logprobs[scored - 1 :].gather(-1, torch.tensor(PROMPT[scored:])[:, None])[:, 0]
    np.testing.assert_allclose(logprobs[scored:], expected.numpy(), atol=1e-4)
    topk_tokens, topk_logprobs = decode_array(result.topk_prompt_tokens), decode_array(result.topk_prompt_logprobs)
    assert (topk_tokens[:scored] == -1).all() and np.isnan(topk_logprobs[:scored]).all()
    assert_top_k(topk_tokens[scored:], topk_logprobs[scored:], prompt_logprobs[scored - 1 :])

    ids = [sequence.sequence_id for response in (result, again) for sequence in response.sequences]
    assert all(re.fullmatch(r"seq-[0-9a-f]{24}", sequence_id) for sequence_id in ids)
    assert len(set(ids)) == len(ids)


def test_greedy_prompt_draws_are_all_the_argmax(session, model):
    result = sample(session, request(temperature=0.0, prompt_alt_tokens_k=3))
    argmax = reference_logprobs(model, PROMPT)[:-1].argmax(-1)
    np.testing.assert_array_equal(decode_array(result.prompt_alt_tokens), argmax[:, None].expand(-1, 3).numpy())
    assert not result.HasField("prompt_logprobs") and not result.sequences[0].HasField("topk_tokens")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"topk_sample_logprobs": 65}, r"sample\.topk_sample_logprobs: 65; expected 0\.\.64"),
        ({"prompt_alt_tokens_k": -1}, r"sample\.prompt_alt_tokens_k: -1; expected 0\.\.64"),
        (
            {"target_prompt_logprobs": encode_array(np.zeros((7, 2), np.int64))},
            r"sample\.target_prompt_logprobs: shape \[7, 2\]; expected \[6, K\]",
        ),
        (
            {"target_prompt_logprobs": encode_array(np.full((6, 2), 300))},
            r"sample\.target_prompt_logprobs: token id 300 is out of range \[0, 259\)",
        ),
        (
            {"target_prompt_logprobs": encode_array(np.zeros((6, 2), np.float32))},
            r"sample\.target_prompt_logprobs: dtype float32; expected int32 or int64",
        ),
        (
            {"prompt_logprobs_last_n": 2},
            r"sample\.prompt_logprobs_last_n: needs include_prompt_logprobs or topk_prompt_logprobs",
        ),
        (
            {"prompt_logprobs_last_n": 7, "include_prompt_logprobs": True},
            r"sample\.prompt_logprobs_last_n: 7; expected 1\.\.6",
        ),
        (
            {"prompt_logprobs_last_n": 0, "topk_prompt_logprobs": 1},
            r"sample\.prompt_logprobs_last_n: 0; expected 1\.\.6",
        ),
    ],
    ids=["topk_sample", "alt_k", "target shape", "target id", "target dtype", "last_n alone", "last_n big", "last_n 0"],
)
def test_bad_sampling_extras_are_rejected_by_name(session, options, message):
    result = session.call(sample=request(**options))
    assert result.error.code == INVALID_ARGUMENT
    assert re.search(message, result.error.message), result.error.message
