"""RMS norms on PyTorch's fused kernel.

Llama's RMSNorm, which most decoder models in Hugging Face copy, computes in eight operations
(upcast, square, mean, epsilon, reciprocal root, scale, downcast, weight): eight kernel launches
per norm on a GPU in bfloat16, two norms per layer. A decode step of a small batch costs what its
launches cost, so these were a fifth of one on an H200 (0.9B Llama, 128 rows).
`torch.nn.functional.rms_norm` computes the same in one; in float32 on a CPU its result is
Llama's to the bit (a GPU's kernel may sum in another order), in bfloat16 it rounds once where
Llama's rounds twice. Training and sampling both run the swapped norms, so the logprobs of one
stay the other's.

A norm is swapped only where its forward is Llama's, instruction for instruction: Gemma's
(1 + weight), OLMo's and other variants keep their own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm


def fuse_rms_norms(model: nn.Module) -> int:
    """Swaps every Llama-form RMS norm of `model` onto the fused kernel, in place (their classes
    become subclasses, so their weights, names and checks stay theirs); how many it swapped."""
    swapped = 0
    for module in model.modules():
        if _is_llama_form(type(module)) and _normalizes_last_dimension(module):
            module.__class__ = _fused(type(module))
            swapped += 1
    return swapped


def _normalizes_last_dimension(module: nn.Module) -> bool:
    """Llama's code normalises over the last dimension and broadcasts its weight; the fused kernel
    normalises over every dimension of the weight: the two agree for a weight of one dimension."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1


def _is_llama_form(cls: type) -> bool:
    forward = cls.__dict__.get("forward")
    if forward is None or not hasattr(forward, "__code__"):
        return False
    code, llama = forward.__code__, LlamaRMSNorm.forward.__code__
    return (code.co_code, code.co_consts, code.co_names) == (llama.co_code, llama.co_consts, llama.co_names)


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # Llama's promotes the two; the fused kernel takes one dtype
        return super(type(self), self).forward(hidden_states)
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


@functools.cache
def _fused(cls: type[nn.Module]) -> type[nn.Module]:
    return type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "__module__": __name__})
