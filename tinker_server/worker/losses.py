"""Built-in losses, one short function each, as the Tinker docs define them.

Each takes one datum's per-token target logprobs [N] (with gradient), its loss inputs
and the loss config, and returns the per-token loss [N]; a datum's loss is the sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Inputs = dict[str, Tensor]
Config = dict[str, float]
LossFn = Callable[[Tensor, Inputs, Config], Tensor]


def cross_entropy(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    weights = inputs.get("weights")
    return -logprobs if weights is None else -logprobs * weights


def importance_sampling(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -ratio * inputs["advantages"]


def ppo(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -torch.minimum(ratio * advantages, clipped * advantages)


def cispo(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    weight = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -weight * logprobs * inputs["advantages"]


def dro(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    penalty = (logprobs - inputs["logprobs"]) ** 2
    return -(logprobs * inputs["advantages"] - 0.5 * config["beta"] * penalty)


def gspo(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """One sequence log-ratio (the masked mean, detached), carried by every token's own
    log-probability for the gradient, then PPO clipping."""
    log_ratio = logprobs - inputs["logprobs"]
    mask = inputs.get("sequence_ratio_mask")
    mask = torch.ones_like(log_ratio) if mask is None else mask
    sequence_log_ratio = (log_ratio * mask).sum() / mask.sum().clamp(min=1.0)
    ratio = torch.exp(sequence_log_ratio.detach() + logprobs - logprobs.detach())
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -torch.minimum(ratio * advantages, clipped * advantages)


LOSS_FUNCTIONS: dict[str, LossFn] = {
    fn.__name__: fn for fn in (cross_entropy, importance_sampling, ppo, cispo, dro, gspo)
}
