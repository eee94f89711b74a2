"""Built-in losses, one short function each, as the Tinker docs define them.

Each takes one datum's per-token target logprobs [N] (with gradient), its loss inputs
and the loss config, and returns the per-token loss [N]; a datum's loss is the sum. A loss
may also report metrics over a batch (LOSS_METRICS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tinker_server.loss_specs import RECORDED_LOGPROBS, SAMPLED_MASK

Inputs = dict[str, Tensor]
Config = dict[str, float]
LossFn = Callable[[Tensor, Inputs, Config], Tensor]
MetricsFn = Callable[[list[Tensor], list[Inputs], Config], dict[str, float]]
"""A batch's per-datum target logprobs, loss inputs and the config -> metrics."""


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


def truncated_importance_weight(logprobs: Tensor, sampler_logprobs: Tensor, config: Config) -> Tensor:
    """min(exp(p - q), max_importance_weight), detached: it scales the gradient, it does not get one."""
    return torch.exp(logprobs - sampler_logprobs).clamp(max=config["max_importance_weight"]).detach()


def stable_reinforce(logprobs: Tensor, inputs: Inputs, config: Config) -> Tensor:
    """Off-policy REINFORCE with truncated importance weights, against the sampler's recorded
    logprobs q (never the client's copy), plus a quadratic pull towards the sampler:
    -w * advantage * p + kl_coeff * (p - q)^2 / 2 at sampled positions; prompt positions give 0."""
    sampler_logprobs = inputs[RECORDED_LOGPROBS]
    weight = truncated_importance_weight(logprobs, sampler_logprobs, config)
    penalty = 0.5 * (logprobs - sampler_logprobs) ** 2
    return (-weight * inputs["advantages"] * logprobs + config["kl_coeff"] * penalty) * inputs[SAMPLED_MASK]


def importance_weight_metrics(logprobs: list[Tensor], inputs: list[Inputs], config: Config) -> dict[str, float]:
    """Mean and max of stable_reinforce's importance weights over the batch's sampled positions."""
    weights = torch.cat(
        [
            truncated_importance_weight(datum_logprobs, datum[RECORDED_LOGPROBS], config)[datum[SAMPLED_MASK] > 0]
            for datum_logprobs, datum in zip(logprobs, inputs, strict=True)
        ]
    )
    if weights.numel() == 0:
        return {}
    return {"importance_weight:mean": float(weights.mean()), "importance_weight:max": float(weights.max())}


LOSS_FUNCTIONS: dict[str, LossFn] = {
    fn.__name__: fn for fn in (cross_entropy, importance_sampling, ppo, cispo, dro, gspo, stable_reinforce)
}
LOSS_METRICS: dict[str, MetricsFn] = {"stable_reinforce": importance_weight_metrics}
