"""What each built-in loss takes: its per-token inputs and its config keys with defaults.

The front end validates requests against these specs (without torch); the worker's
`losses` module implements the formulas under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

InputKind = Literal["int", "float"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    required_inputs: dict[str, InputKind]
    optional_inputs: dict[str, InputKind] = field(default_factory=dict)
    config_defaults: dict[str, float] = field(default_factory=dict)

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
    )
}
