"""SamplingClient: exact against plain torch, reproducible, consistent with training, batched."""

from __future__ import annotations

import asyncio
import inspect
import time

import numpy as np
import pytest
import torch

from tinker_client import BadRequestError, NotFoundError, types
from tinker_client._convert import sampling_params as sampling_params_proto
from tinker_client._convert import tokens_to_proto
from tinker_rpc.v1 import sampling_pb2, service_pb2
from tinker_server.worker.models import build_embedded_model

from .conftest import BASE_MODEL
from .helpers import RawSession, peft_model, ragged_batch, sampler_dir

PROMPT = [256, 72, 105, 33, 32]  # "<bos>Hi! "


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
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=4).result()
    if trained:
        for _ in range(5):
            training.forward_backward(ragged_batch(seed=8, lengths=[16]), "cross_entropy")
            training.optim_step(types.AdamParams(learning_rate=1e-2))
    sampler = training.save_weights_and_get_sampling_client("greedy").result()  # named: its files are written now
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


def trained_sampler(service, seed: int = 4, steps: int = 5):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=seed).result()
    for _ in range(steps):
        training.forward_backward(ragged_batch(seed=8, lengths=[16]), "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=1e-2))
    return training, training.save_weights_and_get_sampling_client().result()


def full_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def test_sampled_logprobs_equal_the_training_forward(service):
    """No sampler/trainer mismatch: importance ratios of fresh samples are exactly 1."""
    training, sampler = trained_sampler(service)
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=1, stop=[])
    response = sampler.sample(types.ModelInput.from_ints(PROMPT), 4, params).result()
    data = []
    for sequence in response.sequences:
        tokens = PROMPT + sequence.tokens
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={"target_tokens": tokens[1:]}
            )
        )
    forward = training.forward(data, "cross_entropy").result()
    for sequence, output in zip(response.sequences, forward.loss_fn_outputs, strict=True):
        trained_logprobs = output["logprobs"].to_numpy()[len(PROMPT) - 1 :]
        np.testing.assert_allclose(sequence.logprobs, trained_logprobs, atol=1e-4)
        # Untempered, untruncated: the behaviour policy is the model itself.
        np.testing.assert_allclose(sequence.sampling_logprobs, sequence.logprobs, atol=1e-5)


def test_a_seed_makes_samples_reproducible_while_samples_of_one_call_differ(service):
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    prompt = types.ModelInput.from_ints(PROMPT)

    def draw(seed: int) -> list[list[int]]:
        params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=seed, stop=[])
        return [sequence.tokens for sequence in sampler.sample(prompt, 4, params).result().sequences]

    first, again, other = draw(7), draw(7), draw(8)
    assert first == again
    assert len({tuple(tokens) for tokens in first}) == 4
    assert first != other


def test_stop_token_ids_and_stop_strings_end_sequences(service):
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    greedy = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0, stop=[])).result()
    tokens = greedy.sequences[0].tokens
    assert greedy.sequences[0].stop_reason == "length" and len(tokens) == 10

    by_token = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0, stop=[tokens[3]]))
    sequence = by_token.result().sequences[0]
    first_hit = tokens.index(tokens[3])
    assert sequence.stop_reason == "stop" and sequence.tokens == tokens[: first_hit + 1]

    stop_string = sampler.get_tokenizer().decode(tokens[3:5])
    by_string = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0, stop=stop_string))
    sequence = by_string.result().sequences[0]
    assert sequence.stop_reason == "stop"
    assert stop_string in sampler.get_tokenizer().decode(sequence.tokens)
    assert len(sequence.tokens) <= 5


def test_end_of_sequence_stops_unless_stop_is_given(service):
    training = service.create_lora_training_client(BASE_MODEL, rank=8, seed=0).result()
    eos = training.get_tokenizer().eos_token_id
    answer = PROMPT + [79, 75, eos]  # "OK<eos>"
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(answer[:-1]), loss_fn_inputs={"target_tokens": answer[1:]}
    )
    for _ in range(30):
        training.forward_backward([datum], "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=3e-3))
    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(PROMPT)
    default = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0)).result().sequences[0]
    assert default.tokens == [79, 75, eos] and default.stop_reason == "stop"
    no_stop = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result()
    assert len(no_stop.sequences[0].tokens) == 8 and no_stop.sequences[0].stop_reason == "length"


@pytest.mark.parametrize(
    "params",
    [
        types.SamplingParams(max_tokens=10, temperature=1.0, top_k=5, seed=3, stop=[]),
        types.SamplingParams(max_tokens=10, temperature=1.0, top_p=0.3, seed=3, stop=[]),
        types.SamplingParams(max_tokens=10, temperature=0.7, top_k=20, top_p=0.9, seed=3, stop=[]),
    ],
    ids=["top_k", "top_p", "temperature+top_k+top_p"],
)
def test_truncation_restricts_the_support_and_reports_the_sampling_distribution(service, params):
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    response = sampler.sample(types.ModelInput.from_ints(PROMPT), 6, params).result()
    model = build_embedded_model()
    for sequence in response.sequences:
        logits = full_logits(model, PROMPT + sequence.tokens)
        for step, token in enumerate(sequence.tokens):
            scaled = logits[len(PROMPT) - 1 + step] / params.temperature
            # As in Hugging Face and vLLM: top-k first, then top-p over what top-k kept.
            order = torch.argsort(scaled, descending=True)
            if params.top_k > 0:
                order = order[: params.top_k]
            probs = torch.softmax(scaled[order], -1)
            mass_before = torch.cumsum(probs, 0) - probs
            support = order[mass_before < params.top_p]
            assert token in support.tolist()
            expected = torch.log_softmax(scaled[support], -1)[support.tolist().index(token)]
            assert sequence.sampling_logprobs[step] == pytest.approx(float(expected), abs=1e-4)
            assert sequence.logprobs[step] == pytest.approx(
                float(torch.log_softmax(logits[len(PROMPT) - 1 + step], -1)[token]), abs=1e-4
            )


def test_a_snapshot_keeps_the_weights_it_saved(service):
    training, sampler = trained_sampler(service, seed=9)
    prompt = types.ModelInput.from_ints(PROMPT)
    greedy = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
    before = sampler.sample(prompt, 1, greedy).result().sequences[0]
    for _ in range(5):
        training.forward_backward(ragged_batch(seed=20, lengths=[24]), "cross_entropy")
        training.optim_step(types.AdamParams(learning_rate=2e-2))
    again = sampler.sample(prompt, 1, greedy).result().sequences[0]
    newer = training.save_weights_and_get_sampling_client().result().sample(prompt, 1, greedy).result().sequences[0]
    assert again.tokens == before.tokens
    np.testing.assert_allclose(again.logprobs, before.logprobs, atol=1e-6)
    assert not np.allclose(newer.logprobs[:3], before.logprobs[:3], atol=1e-3)


def test_two_adapters_sampled_in_one_batch_match_each_sampled_alone(service, server):
    _, first = trained_sampler(service, seed=1, steps=3)
    _, second = trained_sampler(service, seed=2, steps=6)
    prompts = {first.model_path: [256, 65, 66], second.model_path: PROMPT}
    params = {  # one length: rows of one batch finish at one step, so they are answered in one cycle
        first.model_path: types.SamplingParams(max_tokens=14, temperature=0.0, stop=[]),
        second.model_path: types.SamplingParams(max_tokens=14, temperature=0.9, top_k=40, seed=5, stop=[]),
    }
    alone = {
        path: (client.sample(types.ModelInput.from_ints(prompts[path]), 2, params[path]).result())
        for path, client in ((first.model_path, first), (second.model_path, second))
    }

    blocker = service.create_lora_training_client(BASE_MODEL, rank=4, seed=3).result()
    busy = blocker.forward_backward(ragged_batch(seed=12, lengths=[1000] * 12), "cross_entropy")
    time.sleep(0.2)  # past the scheduler's coalescing window: the blocker is running
    sessions = {path: RawSession(server.address) for path in prompts}
    try:
        for path, session in sessions.items():
            session.send(
                service_pb2.SessionRequest(
                    request_id="s",
                    sample=sampling_pb2.SampleRequest(
                        model_path=path,
                        prompt=tokens_to_proto(prompts[path]),
                        num_samples=2,
                        sampling_params=sampling_params_proto(params[path]),
                    ),
                )
            )
        together = {path: [session.receive(), session.receive()][1].result for path, session in sessions.items()}
    finally:
        for session in sessions.values():
            session.close()
    busy.result(timeout=120)
    assert together[first.model_path].cycle_id == together[second.model_path].cycle_id

    from tinker_client._convert import sample_response

    for path, result in together.items():
        batched = sample_response(result)
        for mine, theirs in zip(batched.sequences, alone[path].sequences, strict=True):
            assert mine.tokens == theirs.tokens
            np.testing.assert_allclose(mine.logprobs, theirs.logprobs, atol=1e-5)


def test_prompt_logprobs_and_top_k_match_plain_torch(service):
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    prompt = types.ModelInput.from_ints(PROMPT + [104, 111, 119])
    response = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True, topk_prompt_logprobs=3
    ).result()
    logprobs = sampler.compute_logprobs(prompt).result()
    expected = torch.log_softmax(full_logits(build_embedded_model(), prompt.to_ints()), -1)
    tokens = prompt.to_ints()
    assert logprobs[0] is None and response.prompt_logprobs[0] is None
    for position in range(1, len(tokens)):
        assert logprobs[position] == pytest.approx(float(expected[position - 1, tokens[position]]), abs=1e-4)
        assert response.prompt_logprobs[position] == pytest.approx(logprobs[position], abs=1e-6)
        top = response.topk_prompt_logprobs[position]
        values, indices = torch.topk(expected[position - 1], 3)
        assert [token for token, _ in top] == indices.tolist()
        np.testing.assert_allclose([value for _, value in top], values.numpy(), atol=1e-4)
    assert response.topk_prompt_logprobs[0] is None


@pytest.mark.parametrize(
    ("params", "error", "message"),
    [
        (types.SamplingParams(max_tokens=5, temperature=-1.0), BadRequestError, r"temperature: -1\.0"),
        (types.SamplingParams(max_tokens=5, top_p=0.0), BadRequestError, r"top_p: 0\.0"),
        (types.SamplingParams(max_tokens=5000), BadRequestError, r"max_tokens: 5000"),
        (types.SamplingParams(max_tokens=5, stop=[999]), BadRequestError, r"stop_token_ids: token id 999"),
    ],
)
def test_bad_sampling_params_are_rejected_by_name(service, params, error, message):
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    with pytest.raises(error, match=message):
        sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params).result(timeout=30)


def test_unknown_sampler_paths_and_base_models_are_not_found(service):
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=2)
    with pytest.raises(NotFoundError, match="run-x"):
        service.create_sampling_client(model_path="tinker://run-x/sampler_weights/none").result(timeout=30)
    with pytest.raises(NotFoundError, match="not served"):
        service.create_sampling_client(base_model="other/model").result(timeout=30)
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    assert sampler.sample(prompt, 1, params).result(timeout=30).sequences


def test_a_sampler_of_saved_weights_may_name_their_base_model_too(service):
    """As Tinker allows (the cookbook's KL reference and distillation teacher give both): the saved
    weights are sampled; a base model they were not trained on is refused, never ignored."""
    _, saved = trained_sampler(service, seed=6, steps=2)
    prompt, params = types.ModelInput.from_ints(PROMPT), types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    both = service.create_sampling_client(model_path=saved.model_path, base_model=BASE_MODEL).result()
    base = service.create_sampling_client(base_model=BASE_MODEL).result()
    assert both.model_path == saved.model_path and both.get_base_model() == BASE_MODEL
    sampled, expected, bare = (client.sample(prompt, 1, params).result().sequences[0] for client in (both, saved, base))
    assert sampled.tokens == expected.tokens and sampled.logprobs == expected.logprobs
    assert sampled.tokens_np.flags.writeable and sampled.logprobs_np.flags.writeable  # the caller's own
    assert sampled.logprobs != bare.logprobs
    with pytest.raises(ValueError, match="not of base_model 'other/model'"):
        service.create_sampling_client(model_path=saved.model_path, base_model="other/model").result(timeout=30)


def test_async_forms_ack_then_answer_like_the_sync_ones(service):
    sampler = service.create_sampling_client(base_model=BASE_MODEL).result()
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])

    async def run():
        sampled = await sampler.sample_async(prompt, 1, params)  # one await: the value, as in tinker 0.38
        logprobs = await sampler.compute_logprobs_async(prompt)
        return sampled, await sampler.sample(prompt, 1, params), logprobs, await sampler.get_base_model_async()

    sampled, awaited, logprobs, base_model = asyncio.run(run())
    assert sampled.sequences[0].tokens == sampler.sample(prompt, 1, params).result().sequences[0].tokens
    assert awaited.sequences[0].tokens == sampled.sequences[0].tokens
    assert logprobs == sampler.compute_logprobs(prompt).result()
    assert base_model == BASE_MODEL


# The Tinker SDK's SamplingClient methods (tinker 0.38) and their leading argument names.
TINKER_SAMPLING_METHODS = {
    "sample": ["prompt", "num_samples", "sampling_params", "include_prompt_logprobs", "topk_prompt_logprobs"],
    "compute_logprobs": ["prompt"],
    "get_base_model": [],
}


@pytest.mark.parametrize("method", sorted(TINKER_SAMPLING_METHODS))
def test_sampling_client_has_sync_and_async_forms_with_tinker_argument_names(method):
    from tinker_client import SamplingClient

    expected = TINKER_SAMPLING_METHODS[method]
    for name in (method, f"{method}_async"):
        function = getattr(SamplingClient, name)
        assert inspect.iscoroutinefunction(function) == name.endswith("_async")
        assert list(inspect.signature(function).parameters)[1:][: len(expected)] == expected, name
