"""The built-in losses written out from the Tinker docs' formulas, in plain torch.

Independent of the server's implementation: each returns the per-token loss of one datum
from its target logprobs `lp` (with gradient) and its loss inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    return -(inputs["weights"] * lp) if "weights" in inputs else -lp


def importance_sampling(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    return -(lp - inputs["logprobs"]).exp() * inputs["advantages"]


def ppo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    ratio = (lp - inputs["logprobs"]).exp()
    low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    advantages = inputs["advantages"]
    # The pessimistic choice between the clipped and the unclipped surrogate, token by token.
    return torch.maximum(-ratio * advantages, -ratio.clamp(low, high) * advantages)


def cispo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    with torch.no_grad():
        weight = (
            (lp - inputs["logprobs"])
            .exp()
            .clamp(config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 4.0))
        )
    return -(weight * lp * inputs["advantages"])


def dro(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    beta = config.get("beta", 0.05)
    return -(lp * inputs["advantages"]) + 0.5 * beta * (lp - inputs["logprobs"]) ** 2


def gspo(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    mask = inputs.get("sequence_ratio_mask", torch.ones_like(lp))
    with torch.no_grad():
        sequence_log_ratio = ((lp - inputs["logprobs"]) * mask).sum() / mask.sum()
    # Value: the sequence ratio on every token. Gradient: ratio * d(lp) for each token's own lp.
    ratio = sequence_log_ratio.exp() * (lp - lp.detach()).exp()
    low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    advantages = inputs["advantages"]
    return torch.maximum(-ratio * advantages, -ratio.clamp(low, high) * advantages)


def stable_reinforce(lp: Tensor, inputs: dict[str, Tensor], config: dict[str, float]) -> Tensor:
    """Our definition (docs/losses.md), with the sampler's logprobs `sampler_logprobs` and the
    positions of sampled tokens `sampled_mask`."""
    cap, kl_coeff = config.get("max_importance_weight", 2.0), config.get("kl_coeff", 0.0)
    log_ratio = lp - inputs["sampler_logprobs"]
    with torch.no_grad():
        weight = log_ratio.exp().clamp(max=cap)
    per_token = -(weight * inputs["advantages"] * lp) + kl_coeff * 0.5 * log_ratio**2
    return torch.where(inputs["sampled_mask"] > 0, per_token, torch.zeros_like(per_token))


REFERENCE_LOSSES = {
    fn.__name__: fn for fn in (cross_entropy, importance_sampling, ppo, cispo, dro, gspo, stable_reinforce)
}
