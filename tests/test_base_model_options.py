"""How the worker runs a base model (engine in process): its dtype, its end-of-sequence ids, and
logits computed the way the model's own forward computes them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

from tinker_server import ops
from tinker_server.cli import parse_args
from tinker_server.worker.engine import Engine
from tinker_server.worker.main import build_engine
from tinker_server.worker.models import (
    LoadedModel,
    build_embedded_model,
    byte_tokenizer,
    check_output_logits,
    load_base_model,
    resolve_dtype,
)

from .engine_helpers import batches, engine_with_adapters, forward_backward, gradients, lora_spec

CPU = torch.device("cpu")
PROMPT = np.array([256, 72, 105, 33, 32], dtype=np.int64)
BFLOAT16_TOLERANCE = 0.05
"""On logprobs of about -5.6. bfloat16 keeps 8 significant bits, so the embedded model's hidden
states (magnitude up to ~4) are rounded to steps of 2^-6 (to 2^-5 above 4); two computations of
one logprob (from float32 vs bfloat16 weights, or by cached decoding vs one full pass) differ by a
few such steps. Measured: at most 0.027 for both."""


def sample(
    engine: Engine, adapter: str | None, prompts: list[np.ndarray], max_tokens: int, samples: int = 1, **params
) -> list[ops.SequenceArrays]:
    """`samples` sequences of each prompt (greedy unless params say otherwise), all in one batch."""
    config = dataclasses.replace(ops.SamplingConfig(max_tokens, 0.0, -1, 1.0, 1, (), (), False), **params)
    items = [
        ops.WorkItem(f"s{index}", "", ops.Sample(adapter, None, prompt, samples, config, False, 0))
        for index, prompt in enumerate(prompts)
    ]
    outcomes = engine.run_cycle(ops.Cycle(3, items))
    assert all(outcome.error is None for outcome in outcomes), [outcome.error for outcome in outcomes]
    return [sequence for outcome in outcomes for sequence in outcome.result.sequences]


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([grad.flatten() for grad in grads])


def test_bfloat16_base_weights_train_like_float32_to_bfloat16_precision():
    data = batches()
    engines = {dtype: engine_with_adapters(dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    before = {dtype: forward_backward(engine, data) for dtype, engine in engines.items()}
    grads = {dtype: gradients(engine) for dtype, engine in engines.items()}
    adam = ops.AdamConfig(1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0)  # moves logprobs by ~2.7
    for engine in engines.values():
        steps = [ops.WorkItem(name, name, ops.OptimStep(adam)) for name in engine.residency.resident_runs()]
        assert all(outcome.error is None for outcome in engine.run_cycle(ops.Cycle(2, steps)))
    after = {dtype: forward_backward(engine, data, backward=False) for dtype, engine in engines.items()}

    assert_close(before[torch.bfloat16], before[torch.float32], BFLOAT16_TOLERANCE)
    assert_close(after[torch.bfloat16], after[torch.float32], BFLOAT16_TOLERANCE)
    assert not close(after[torch.float32], before[torch.float32], 10 * BFLOAT16_TOLERANCE)  # the step mattered
    for name, expected in grads[torch.float32].items():
        error = flat(grads[torch.bfloat16][name]) - flat(expected)
        assert float(error.norm() / flat(expected).norm()) < BFLOAT16_TOLERANCE  # measured: 0.017 and 0.028
    engine = engines[torch.bfloat16]
    assert engine.model.dtype == torch.bfloat16
    adapter = engine.residency.run("a")
    assert {param.dtype for param in adapter.parameters()} == {torch.float32}
    assert {state["exp_avg_sq"].dtype for state in adapter.optimizer.state.values()} == {torch.float32}


def close(actual: list[list[np.ndarray]], expected: list[list[np.ndarray]], tolerance: float) -> bool:
    return all(
        np.allclose(got, want, rtol=0, atol=tolerance)
        for got_item, want_item in zip(actual, expected, strict=True)
        for got, want in zip(got_item, want_item, strict=True)
    )


def assert_close(actual: list[list[np.ndarray]], expected: list[list[np.ndarray]], tolerance: float) -> None:
    worst = max(
        np.abs(got - want).max() for a, e in zip(actual, expected, strict=True) for got, want in zip(a, e, strict=True)
    )
    assert worst <= tolerance, f"logprobs differ by up to {worst}"


def test_sampled_logprobs_equal_the_training_forward_with_bfloat16_weights(tmp_path: Path):
    engine = engine_with_adapters(("a",), dtype=torch.bfloat16)
    path = "tinker://a/sampler_weights/s"
    (saved,) = engine.run_cycle(ops.Cycle(2, [ops.WorkItem("s", "a", ops.SaveForSampler(path, str(tmp_path)))]))
    assert saved.error is None
    sequences = sample(engine, path, [PROMPT], 24, samples=4, temperature=1.0, ignore_eos=True)
    assert len({tuple(sequence.tokens) for sequence in sequences}) == 4
    data = []
    for sequence in sequences:
        tokens = np.concatenate([PROMPT, sequence.tokens.astype(np.int64)])
        data.append(ops.DatumArrays(tokens[:-1], {"target_tokens": tokens[1:]}))
    (forward,) = forward_backward(engine, {"a": data}, backward=False)
    assert_close(
        [[sequence.logprobs for sequence in sequences]],
        [[logprobs[len(PROMPT) - 1 :] for logprobs in forward]],
        BFLOAT16_TOLERANCE,
    )


def test_dtype_flag_and_environment(monkeypatch):
    monkeypatch.setenv("TINKER_SERVER_DTYPE", "bfloat16")
    assert parse_args(["--allow-unauthenticated"]).worker.dtype == "bfloat16"
    assert parse_args(["--allow-unauthenticated", "--dtype", "float16"]).worker.dtype == "float16"
    monkeypatch.setenv("TINKER_SERVER_DTYPE", "bf16")
    with pytest.raises(SystemExit):
        parse_args(["--allow-unauthenticated"])
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("float16", CPU) == torch.float16


def test_sampling_stops_at_every_end_of_sequence_id_of_the_generation_config(tmp_path: Path):
    """A directory whose generation_config.json lists two EOS ids, each the second greedy token
    of one of two prompts; the tokenizer's own EOS counts too."""
    prompts = [PROMPT, np.array([256, 79, 75], dtype=np.int64)]
    free = sample(Engine(load_base_model(None), CPU), None, prompts, 4, ignore_eos=True)
    eos = [int(sequence.tokens[1]) for sequence in free]
    assert not {int(sequence.tokens[0]) for sequence in free} & set(eos) and len(set(eos)) == 2
    build_embedded_model().save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))

    engine = build_engine(str(tmp_path), ops.WorkerOptions(dtype="float32"), CPU)
    assert engine.info().eos_token_ids == tuple(sorted({*eos, byte_tokenizer().eos_token_id}))
    stopped = sample(engine, None, prompts, 4)
    assert [sequence.tokens.tolist() for sequence in stopped] == [sequence.tokens[:2].tolist() for sequence in free]
    assert all(sequence.stopped for sequence in stopped)
    unstopped = sample(engine, None, prompts, 4, ignore_eos=True)
    assert [sequence.tokens.tolist() for sequence in unstopped] == [sequence.tokens.tolist() for sequence in free]


TINY = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY |= {"num_attention_heads": 4, "num_key_value_heads": 2}
LOGIT_POSTPROCESSING = {
    # Gemma 2 caps its logits (at 30 in the real ones; at 1 here, so that the cap shapes them all),
    # Cohere multiplies them, Granite divides them.
    "gemma2": Gemma2Config(**TINY, head_dim=16, final_logit_softcapping=1.0),
    "cohere": CohereConfig(**TINY, logit_scale=4.0),
    "granite": GraniteConfig(**TINY, logits_scaling=0.25),
}


@pytest.mark.parametrize("name", sorted(LOGIT_POSTPROCESSING))
def test_logits_are_scaled_and_capped_as_the_config_declares(name: str):
    """The engine's logprobs are the model's own, its final scaling or capping included."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LOGIT_POSTPROCESSING[name]).eval()
    engine = Engine(LoadedModel(name, model, byte_tokenizer(), 256, (257,)), CPU)
    check_output_logits(engine.model)
    engine.run_cycle(ops.Cycle(0, [ops.WorkItem("c", "a", ops.CreateAdapter(lora_spec(0)))]))  # B = 0: the base model
    data = batches()["a"]
    (logprobs,) = forward_backward(engine, {"a": data}, backward=False)
    with torch.no_grad():
        for datum, got in zip(data, logprobs, strict=True):
            logits = engine.model(input_ids=torch.from_numpy(datum.tokens)[None]).logits[0].float()
            targets = torch.from_numpy(datum.loss_fn_inputs["target_tokens"])[:, None]
            expected = torch.log_softmax(logits, -1).gather(-1, targets)[:, 0]
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_a_model_whose_forward_computes_its_logits_otherwise_is_refused():
    model = build_embedded_model()
    model.config.final_logit_softcapping = 1.0  # declared, but the Llama forward never applies it
    with pytest.raises(ValueError, match="its logits are not its output embedding"):
        check_output_logits(model)
