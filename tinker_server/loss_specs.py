"""What each built-in loss takes: its per-token inputs and its config keys with defaults.

The front end validates requests against these specs (without torch); the worker's
`losses` module implements the formulas under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

InputKind = Literal["int", "float"]
ConfigRule = tuple[Callable[[float], bool], str]
"""A constraint on a config value beyond being finite, and how to say it (e.g. "> 0")."""

# Loss inputs the server adds from its records, for losses that need provenance: float32 [N].
# Their names are no client key (a client's keys are checked against the spec first).
RECORDED_LOGPROBS = "recorded:sampler_logprobs"
"""At each loss position under a SAMPLED span: the sampler's recorded logprob; 0 elsewhere."""
SAMPLED_MASK = "recorded:sampled_mask"
"""1 at loss positions under SAMPLED spans, 0 under PROMPT spans."""


@dataclass(frozen=True)
class LossSpec:
    name: str
    required_inputs: dict[str, InputKind]
    optional_inputs: dict[str, InputKind] = field(default_factory=dict)
    config_defaults: dict[str, float] = field(default_factory=dict)
    config_rules: dict[str, ConfigRule] = field(default_factory=dict)
    needs_provenance: bool = False
    """Every datum must carry provenance spans; the worker gets RECORDED_LOGPROBS and SAMPLED_MASK."""

    def all_inputs(self) -> dict[str, InputKind]:
        return {**self.required_inputs, **self.optional_inputs}


_POLICY_INPUTS: dict[str, InputKind] = {"target_tokens": "int", "logprobs": "float", "advantages": "float"}

LOSS_SPECS: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("cross_entropy", {"target_tokens": "int"}, {"weights": "float"}),
        LossSpec("importance_sampling", _POLICY_INPUTS),
        LossSpec("ppo", _POLICY_INPUTS, config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        LossSpec("cispo", _POLICY_INPUTS, config_defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
        LossSpec("dro", _POLICY_INPUTS, config_defaults={"beta": 0.05}),
        LossSpec(
            "gspo",
            _POLICY_INPUTS,
            {"sequence_ratio_mask": "float"},
            config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        ),
        LossSpec(
            "stable_reinforce",
            {"target_tokens": "int", "advantages": "float"},
            {"logprobs": "float"},  # the client's copy of the sampler's logprobs: accepted, not used
            config_defaults={"max_importance_weight": 2.0, "kl_coeff": 0.0},
            config_rules={
                "max_importance_weight": (lambda value: value > 0, "> 0"),
                "kl_coeff": (lambda value: value >= 0, ">= 0"),
            },
            needs_provenance=True,
        ),
    )
}
