"""RMS norms on the fused kernel (tinker_server/worker/fused_norms.py): swapped exactly where
they are Llama's, and computing what they computed."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.architectures import CONFIGS
from tinker_server.worker.engine import Engine
from tinker_server.worker.fused_norms import fuse_rms_norms
from tinker_server.worker.models import load_base_model

SWAPPED = {
    "llama": 5,  # two per layer and the final norm
    "qwen3": 9,  # and each layer's query and key norms
    "qwen3_moe": 9,
    "mistral": 5,
    "phi3": 5,
    "gemma3": 0,  # (1 + weight)
    "gpt_oss": 0,  # weighs before it casts back
    "gpt2": 0,  # LayerNorm
}


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_a_model_with_fused_norms_computes_its_logits_and_gradients_as_before(architecture):
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(CONFIGS[architecture]()).eval()
    fused = copy.deepcopy(original)
    assert fuse_rms_norms(fused) == SWAPPED[architecture]
    assert fused.state_dict().keys() == original.state_dict().keys()
    tokens = torch.randint(0, 256, (2, 12))
    outputs = []
    for model in (original, fused):
        embeddings = model.get_input_embeddings()(tokens).detach().requires_grad_()
        logits = model(inputs_embeds=embeddings).logits
        logits.logsumexp(-1).sum().backward()
        outputs.append((logits.detach(), embeddings.grad))
    (logits, gradient), (fused_logits, fused_gradient) = outputs
    assert torch.equal(fused_logits, logits)  # float32: Llama's to the bit
    torch.testing.assert_close(fused_gradient, gradient, rtol=0, atol=1e-6)


def test_a_fused_norm_rounds_bfloat16_once_and_falls_back_on_mixed_dtypes():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(512, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    hidden = torch.randn(4, 3, 512).bfloat16()
    llama = copy.deepcopy(norm).bfloat16()
    fused = copy.deepcopy(llama)
    fuse_rms_norms(fused)
    exact = copy.deepcopy(llama).float()(hidden.float())  # on the same bfloat16 inputs and weights
    fused_error = (fused(hidden).float() - exact).abs()
    assert (fused_error <= exact.abs() * 2**-8).all()  # half a unit in bfloat16's last place: one rounding
    assert fused_error.max() <= (llama(hidden).float() - exact).abs().max()  # Llama's rounds twice
    float32_weight = copy.deepcopy(norm)
    fuse_rms_norms(float32_weight)
    assert torch.equal(float32_weight(hidden), norm(hidden))  # Llama's own promotion to float32


def test_norms_of_another_form_are_left_alone():
    gemma = GemmaRMSNorm(64)
    assert fuse_rms_norms(gemma) == 0 and type(gemma) is GemmaRMSNorm
    per_head = LlamaRMSNorm(8)  # Llama's code with a [heads, dim] weight: still over the last dimension alone
    per_head.weight = torch.nn.Parameter(torch.randn(2, 8))
    assert fuse_rms_norms(per_head) == 0 and type(per_head) is LlamaRMSNorm


def test_the_worker_runs_its_model_on_fused_norms():
    engine = Engine(load_base_model(None), torch.device("cpu"))
    norms = [module for module in engine.model.modules() if isinstance(module, LlamaRMSNorm)]
    assert len(norms) == 2 * engine.model.config.num_hidden_layers + 1
    assert all(type(norm).__name__ == "FusedLlamaRMSNorm" for norm in norms)
