"""Training types: optimizer settings, LoRA configuration, and what training calls return."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from tinker_client.types.inputs import Datum
from tinker_client.types.tensors import TensorData

ModelID: TypeAlias = str
LossFnType: TypeAlias = Literal[
    "cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce", "custom"
]
LossFnInputs: TypeAlias = dict[str, TensorData]
LossFnOutput: TypeAlias = dict[str, TensorData]
CustomLossInputRank: TypeAlias = Literal[0, 1, 2]
"""A custom loss input's rank: 0 is a scalar, 1 is [T] and 2 is [T, K]."""


@dataclass(frozen=True)
class AdamParams:
    """One AdamW step (decoupled weight decay, exactly torch.optim.AdamW)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm of the adapter to this value first; 0 disables it."""


@dataclass(frozen=True)
class DimuonParams:
    """Tinker's Dimuon optimizer step. This server trains with AdamW only: a run created
    with the Dimuon optimizer is refused at creation."""

    learning_rate: float
    type: Literal["dimuon"] = "dimuon"
    grad_clip_norm: float = 0.0
    beta1: float = 0.9

    def __post_init__(self) -> None:
        if not (math.isfinite(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(f"DimuonParams.learning_rate: {self.learning_rate}; must be >= 0")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"DimuonParams.beta1: {self.beta1}; must be in [0, 1)")


OptimParams: TypeAlias = AdamParams | DimuonParams


@dataclass(frozen=True)
class AdamOptimizerConfig:
    """Train with AdamW (the default)."""

    type: Literal["adamw"] = "adamw"


@dataclass(frozen=True)
class DimuonOptimizerConfig:
    """Tinker's Dimuon optimizer; not implemented by this server (creation is refused)."""

    type: Literal["dimuon"] = "dimuon"
    version: Literal[1] = 1


OptimizerConfig: TypeAlias = AdamOptimizerConfig | DimuonOptimizerConfig


@dataclass(frozen=True)
class CustomLossInput:
    """One input of a custom loss, with the rank every datum's value has."""

    name: str
    rank: CustomLossInputRank


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


@dataclass(frozen=True)
class ForwardBackwardInput:
    data: list[Datum]
    loss_fn: LossFnType
    loss_fn_config: dict[str, float | str] | None = None


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Result of `forward` / `forward_backward`: per-datum outputs and batch metrics."""

    loss_fn_output_type: str
    loss_fn_outputs: list[LossFnOutput]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimStepResponse:
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class SaveWeightsForSamplerResponse:
    path: str
    type: Literal["save_weights_for_sampler"] | None = None

    def get_console_url(self) -> str:
        return no_console()

    def get_playground_url(self) -> str:
        return no_console()


@dataclass(frozen=True)
class SaveWeightsResponse:
    """Result of `save_state`: the tinker://<run>/weights/<name> path."""

    path: str
    type: Literal["save_weights"] | None = None

    def get_console_url(self) -> str:
        return no_console()


@dataclass(frozen=True)
class SaveWeightsExternalResponse:
    path: str
    type: Literal["save_weights_external"] | None = None


@dataclass(frozen=True)
class LoadWeightsResponse:
    path: str | None = None
    model_id: str | None = None
    type: Literal["load_weights"] | None = None


@dataclass(frozen=True)
class ModelData:
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


@dataclass(frozen=True)
class GetInfoResponse:
    model_data: ModelData
    model_id: ModelID
    type: Literal["get_info"] | None = None
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    lora_config: LoraConfig | None = None
    """The adapter's configuration; its seed is the one the server used."""
    lora_alpha: float | None = None
    """LoRA scaling numerator: the update is (lora_alpha / rank) * B @ A."""
    trained_modules: list[str] | None = None
    """Exactly the weights the adapter adapts, by module path (fused experts: "<module>.<parameter>")."""


def no_console() -> str:
    """A checkpoint has no console page of its own here: its run's page lists it."""
    from tinker_client.errors import UnsupportedFeatureError

    raise UnsupportedFeatureError(
        "console URLs of checkpoints: open their run's page (TrainingClient.get_console_url()), which lists them"
    )


def console_page(console_url: str, page: str) -> str:
    """`page` of the server's web console, at the base URL the server gave; raises when it has none."""
    from tinker_client.errors import UnsupportedFeatureError

    if not console_url:
        raise UnsupportedFeatureError(
            "console URLs: the server's web console is off; start tinker-server with --console-port PORT "
            "(and --console-url URL if browsers reach it by another address)"
        )
    return f"{console_url.rstrip('/')}/{page}"
