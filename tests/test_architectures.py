"""LoRA on real architectures: each flag trains exactly the weights it names (fused projections,
GPT-2's Conv1D, mixture-of-experts weights per expert), a saved adapter gives peft's logprobs,
and tenants with different flags share one pass. Tiny seeded configs, in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from tinker_server import ops
from tinker_server.worker import sampling
from tinker_server.worker.engine import Engine
from tinker_server.worker.models import load_base_model
from tinker_server.worker.sampling import Generation

from .architectures import CONFIGS, EXPECTED_TARGETS, leaf, save_model

ADAM = ops.AdamConfig(1e-2, 0.9, 0.95, 1e-8, 0.0, 0.0)
FLAGS = {"attn": (False, True, False), "mlp": (True, False, False), "unembed": (False, False, True)}


def spec(kinds: str, seed: int = 0) -> ops.LoraSpec:
    """LoraSpec(rank, seed, train_mlp, train_attn, train_unembed, alpha) for the named flags."""
    mlp, attn, unembed = (any(FLAGS[kind][index] for kind in kinds.split("+")) for index in range(3))
    return ops.LoraSpec(4, seed, mlp, attn, unembed, 8.0)


def batch() -> list[ops.DatumArrays]:
    rng = np.random.default_rng(0)
    data = []
    for length in (9, 6):
        tokens = rng.integers(0, 256, size=length + 1)
        data.append(ops.DatumArrays(tokens[:-1], {"target_tokens": tokens[1:]}))
    return data


class Tenant:
    """One adapter on an in-process engine, driven through its clock cycles."""

    engine: Engine
    cycles = iter(range(1, 1 << 30))

    def __init__(self, engine: Engine, model_id: str, lora: ops.LoraSpec) -> None:
        self.engine, self.model_id = engine, model_id
        self.created = self.run(ops.CreateAdapter(lora))

    def item(self, operation: ops.Operation) -> ops.WorkItem:
        return ops.WorkItem(f"{self.model_id}-{next(self.cycles)}", self.model_id, operation)

    def run(self, operation: ops.Operation) -> ops.OpResult:
        (outcome,) = self.engine.run_cycle(ops.Cycle(next(self.cycles), [self.item(operation)]))
        assert outcome.error is None, outcome.error
        return outcome.result

    def forward(self, backward: bool = False) -> ops.ForwardBackwardResult:
        return self.run(ops.ForwardBackward(batch(), "cross_entropy", {}, backward))

    def train(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            losses.append(self.forward(backward=True).metrics["loss:sum"])
            self.run(ops.OptimStep(ADAM))
        return losses


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def architecture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Engine]:
    directory = save_model(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, directory, Engine(load_base_model(str(directory)), torch.device("cpu"))


def test_each_flag_alone_trains_exactly_the_weights_it_names(architecture):
    name, _, engine = architecture
    assert engine.info().model_type == CONFIGS[name]().model_type
    base = {key: value.clone() for key, value in engine.model.state_dict().items()}
    for kind in FLAGS:
        tenant = Tenant(engine, f"{name}-{kind}", spec(kind))
        trained = tenant.created.trained_modules
        assert trained and {leaf(path) for path in trained} == EXPECTED_TARGETS[name][kind]
        assert set(trained) == set(engine.info().lora_targets[kind])
        losses = tenant.train(6)
        assert losses[-1] < 0.95 * losses[0], (kind, losses)  # it trains: the loss falls
    assert all(torch.equal(value, base[key]) for key, value in engine.model.state_dict().items())  # base frozen


def test_a_saved_adapter_gives_peft_the_same_logprobs(architecture, tmp_path):
    name, directory, engine = architecture
    tenant = Tenant(engine, f"{name}-all", spec("attn+mlp+unembed", seed=1))
    tenant.train(2)  # B != 0 everywhere, so every adapted weight counts
    ours = tenant.forward()
    adapter = tmp_path / "adapter"
    tenant.run(ops.SaveForSampler(f"tinker://{tenant.model_id}/sampler_weights/peft", str(adapter)))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(directory), str(adapter)).eval()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(reference, save_embedding_layers=False)  # peft read every tensor
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[key], saved[key]) for key in saved)
    with torch.no_grad():
        for datum, output in zip(batch(), ours.loss_fn_outputs, strict=True):
            logits = reference(input_ids=torch.from_numpy(datum.tokens)[None]).logits[0].float()
            expected = torch.log_softmax(logits, -1).gather(
                -1, torch.from_numpy(datum.loss_fn_inputs["target_tokens"])[:, None]
            )
            np.testing.assert_allclose(output["logprobs"], expected[:, 0].numpy(), atol=1e-4)


def test_tenants_with_different_flags_share_one_pass(architecture):
    name, _, engine = architecture
    tenants = [Tenant(engine, f"{name}-{kinds}", spec(kinds, seed=2)) for kinds in ("attn", "mlp+unembed")]
    for tenant in tenants:
        tenant.train(1)
    alone = [tenant.forward().loss_fn_outputs for tenant in tenants]
    items = [tenant.item(ops.ForwardBackward(batch(), "cross_entropy", {}, False)) for tenant in tenants]
    together = engine.run_cycle(ops.Cycle(next(Tenant.cycles), items))
    for outputs, outcome in zip(alone, together, strict=True):
        for solo, shared in zip(outputs, outcome.result.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(shared["logprobs"], solo["logprobs"], atol=1e-5)
    assert not np.allclose(alone[0][0]["logprobs"], alone[1][0]["logprobs"])


def test_sampling_over_cycles_with_late_requests_joining_draws_what_each_draws_alone(architecture):
    """Chunked decoding and rows joining a running batch (sliding windows included, past their
    length): a seeded sample is the same as generated alone in one cycle, on every architecture."""
    name, _, engine = architecture
    tenants = [Tenant(engine, f"{name}-sample-{kinds}", spec(kinds, seed=3)) for kinds in ("attn+mlp", "unembed")]
    for tenant in tenants:
        tenant.train(1)

    def sample(tenant: Tenant, prompt: list[int], num_samples: int, seed: int) -> ops.Sample:
        params = ops.SamplingConfig(10, 1.0, 0, 1.0, seed, (), (), True)
        return ops.Sample(tenant.model_id, None, np.asarray(prompt, dtype=np.int64), num_samples, params, False, 0)

    early, late = sample(tenants[0], [256, 72, 105, 33, 10], 2, seed=5), sample(tenants[1], [256, 9], 3, seed=6)
    alone = [tenant.run(request) for tenant, request in zip(tenants, (early, late), strict=True)]
    answered: dict[str, ops.SampleResult] = {}
    pending = [[tenants[0].item(early)], [tenants[1].item(late)]]
    while len(answered) < 2:
        items = pending.pop(0) if pending else []
        for outcome in engine.run_cycle(ops.Cycle(next(Tenant.cycles), items), decode_seconds=0.0):
            assert outcome.error is None, outcome.error
            answered[outcome.future_id.rsplit("-", 1)[0]] = outcome.result
        assert engine.decoder.batches <= 1  # the late rows joined the early ones' batch
    for tenant, lonely in zip(tenants, alone, strict=True):
        together = answered[tenant.model_id]
        assert [s.tokens.tolist() for s in together.sequences] == [s.tokens.tolist() for s in lonely.sequences]
        for joined, single in zip(together.sequences, lonely.sequences, strict=True):
            np.testing.assert_allclose(joined.logprobs, single.logprobs, atol=1e-4)


def test_prompts_of_one_batch_beginning_alike_draw_what_each_draws_computed_whole(architecture):
    """Two prompts sharing a 24-token prefix in one batch: the second reuses the first's whole
    block where every cache layer is a plain one (a sliding window keeps too little of a prompt to
    reuse), and each draws what it draws with its prompt computed whole."""
    name, _, engine = architecture
    prefix = [256, *range(30, 53)]
    params = ops.SamplingConfig(6, 1.0, 0, 1.0, 11, (), (), True)
    requests = [
        ops.Sample(None, None, np.asarray(prefix + tail, dtype=np.int64), 2, params, False, 0)
        for tail in ([1, 2, 3], [4, 5])
    ]

    def results(*batch: ops.Sample) -> list[ops.SampleResult]:
        items = [ops.WorkItem(f"{name}-prefix-{index}", "", request) for index, request in enumerate(batch)]
        outcomes = engine.run_cycle(ops.Cycle(next(Tenant.cycles), items))
        assert all(outcome.error is None for outcome in outcomes), [outcome.error for outcome in outcomes]
        return [outcome.result for outcome in outcomes]

    engine.decoder.budget.prefixes.shrink_to(0)
    together = results(*requests)
    reuses = all(type(layer) is DynamicLayer for layer in DynamicCache(config=engine.model.config).layers)
    assert [result.prompt_cache_hit_tokens for result in together] == [0, 16 if reuses else 0]
    for request, shared in zip(requests, together, strict=True):
        engine.decoder.budget.prefixes.shrink_to(0)
        (whole,) = results(request)
        assert [s.tokens.tolist() for s in shared.sequences] == [s.tokens.tolist() for s in whole.sequences]
        for joined, single in zip(shared.sequences, whole.sequences, strict=True):
            np.testing.assert_allclose(joined.logprobs, single.logprobs, atol=1e-4)


def test_prompts_of_different_lengths_prefilled_apart_draw_what_each_draws_alone(architecture, monkeypatch):
    """A short and a long prompt in one batch are prefilled in passes of their own, then joined
    (sliding windows included, the long prompt past their length): each draws what it draws alone."""
    name, _, engine = architecture
    params = ops.SamplingConfig(6, 1.0, 0, 1.0, 13, (), (), True)
    requests = [
        ops.Sample(None, None, np.asarray(prompt, dtype=np.int64), 2, params, False, 0)
        for prompt in ([256, 5, 6], [256, *range(40, 60)])
    ]
    monkeypatch.setattr(sampling, "UNSPLIT_PREFILL_TOKENS", 0)  # a pass per length, however short
    passes: list[int] = []
    prefill = Generation._prefill

    def counted_prefill(generation: Generation, prompts, requests):
        passes.append(len(prompts))
        return prefill(generation, prompts, requests)

    monkeypatch.setattr(Generation, "_prefill", counted_prefill)

    def results(*batch: ops.Sample) -> list[ops.SampleResult]:
        engine.decoder.budget.prefixes.shrink_to(0)
        items = [ops.WorkItem(f"{name}-lengths-{index}", "", request) for index, request in enumerate(batch)]
        outcomes = engine.run_cycle(ops.Cycle(next(Tenant.cycles), items))
        assert all(outcome.error is None for outcome in outcomes), [outcome.error for outcome in outcomes]
        return [outcome.result for outcome in outcomes]

    together = results(*requests)
    assert len(passes) == 2
    for request, shared in zip(requests, together, strict=True):
        (alone,) = results(request)
        assert [s.tokens.tolist() for s in shared.sequences] == [s.tokens.tolist() for s in alone.sequences]
        for joined, single in zip(shared.sequences, alone.sequences, strict=True):
            np.testing.assert_allclose(joined.logprobs, single.logprobs, atol=1e-4)
