"""Public data types of the SDK, with the names, fields and defaults of the Tinker SDK.

Tensors are numpy arrays inside; torch is optional and converted to without copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch

TensorDtype: TypeAlias = Literal["int64", "int32", "float32"]
LossFnType: TypeAlias = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo"]
StopReason: TypeAlias = Literal["length", "stop"]

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "float32": np.dtype(np.float32),
}


@dataclass(frozen=True, eq=False, init=False)
class TensorData:
    """A dense tensor. Build it with `from_numpy`, `from_torch` or from a list and a dtype.

    >>> TensorData.from_numpy(np.array([1.0, 0.5], dtype=np.float32)).shape
    [2]
    """

    array: np.ndarray

    def __init__(
        self,
        data: Sequence[int] | Sequence[float] | np.ndarray | None = None,
        dtype: TensorDtype | None = None,
        shape: Sequence[int] | None = None,
    ) -> None:
        if isinstance(data, np.ndarray) and dtype is None:
            dtype = _dtype_name(data.dtype)
        if dtype not in _NUMPY_DTYPES:
            raise TypeError(f"TensorData dtype must be one of {sorted(_NUMPY_DTYPES)}, got {dtype!r}")
        array = np.asarray([] if data is None else data, dtype=_NUMPY_DTYPES[dtype])
        if shape is not None:
            array = array.reshape(tuple(shape))
        object.__setattr__(self, "array", array)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        return cls(array)

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """Shares memory with a CPU tensor of a supported dtype; bfloat16/float16 widen."""
        import torch

        if tensor.dtype in (torch.bfloat16, torch.float16, torch.float64):
            tensor = tensor.float()
        return cls(tensor.detach().cpu().numpy())

    @property
    def dtype(self) -> TensorDtype:
        return _dtype_name(self.array.dtype)

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    @property
    def data(self) -> list[int] | list[float]:
        """The elements, flattened, as a Python list."""
        return self.array.reshape(-1).tolist()

    def to_numpy(self) -> np.ndarray:
        return self.array

    def to_torch(self) -> torch.Tensor:
        import torch

        array = self.array if self.array.flags.writeable else self.array.copy()
        return torch.from_numpy(array)

    def tolist(self) -> list[Any]:
        return self.array.tolist()

    def __repr__(self) -> str:
        return f"TensorData(dtype={self.dtype!r}, shape={self.shape})"


def _dtype_name(dtype: np.dtype) -> TensorDtype:
    for name, candidate in _NUMPY_DTYPES.items():
        if candidate == dtype:
            return name  # type: ignore[return-value]
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return "int64"
    if np.issubdtype(dtype, np.floating):
        return "float32"
    raise TypeError(f"unsupported dtype {dtype}; use an integer or floating type")


@dataclass(frozen=True)
class EncodedTextChunk:
    """A run of token ids."""

    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class ModelInput:
    """The tokens fed to the model, as a list of chunks.

    >>> ModelInput.from_ints([1, 2, 3]).append_int(4).to_ints()
    [1, 2, 3, 4]
    """

    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: Sequence[int] | np.ndarray) -> ModelInput:
        """A numpy array is kept as it is (no per-token Python objects on the way to the wire)."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens if isinstance(tokens, np.ndarray) else list(tokens))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return self.to_numpy().tolist()

    def to_numpy(self) -> np.ndarray:
        """All tokens as one int64 array."""
        if not self.chunks:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([np.asarray(chunk.tokens, dtype=np.int64) for chunk in self.chunks])

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


# Dtype of a loss input given as a plain list, where nothing else says it.
_LIST_INPUT_DTYPES: dict[str, TensorDtype] = {"target_tokens": "int64"}


def _as_tensor_data(key: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)
    return TensorData(value, dtype=_LIST_INPUT_DTYPES.get(key, "float32"))


@dataclass(frozen=True)
class Datum:
    """One training example. `loss_fn_inputs` values may be TensorData, numpy, torch or lists.

    >>> Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    """

    model_input: ModelInput
    loss_fn_inputs: Mapping[str, TensorData] = field(default_factory=dict)

    def __post_init__(self) -> None:
        converted = {key: _as_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()}
        object.__setattr__(self, "loss_fn_inputs", converted)


LossFnOutput: TypeAlias = dict[str, TensorData]


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """Result of `forward` / `forward_backward`: per-datum outputs and batch metrics."""

    loss_fn_output_type: str
    loss_fn_outputs: list[LossFnOutput]
    metrics: dict[str, float] = field(default_factory=dict)


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
class OptimStepResponse:
    metrics: dict[str, float] | None = None


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    seed: int | None = None
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True


@dataclass(frozen=True)
class ModelData:
    arch: str | None = None
    model_name: str | None = None
    tokenizer_id: str | None = None


@dataclass(frozen=True)
class GetInfoResponse:
    model_id: str
    model_data: ModelData
    is_lora: bool | None = None
    lora_rank: int | None = None
    model_name: str | None = None
    lora_config: LoraConfig | None = None
    lora_alpha: float | None = None


@dataclass(frozen=True)
class SupportedModel:
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None
    vocab_size: int | None = None


@dataclass(frozen=True)
class GetServerCapabilitiesResponse:
    supported_models: list[SupportedModel]
    max_lora_rank: int | None = None
    max_message_bytes: int | None = None
    max_adapters: int | None = None
    max_inflight_requests: int | None = None
    """Requests one client may have in flight; the SDK queues the rest (flow control)."""
    max_batch_tokens: int | None = None
    max_num_samples: int | None = None


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. `temperature=0` is greedy.

    `stop`: None stops at the tokenizer's end-of-sequence token; a string, list of
    strings or list of token ids stops there instead; [] disables stopping.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | Sequence[str] | Sequence[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclass(frozen=True)
class SampledSequence:
    """One generated sequence.

    `logprobs`: the model's own log-probabilities of the chosen tokens (temperature 1,
    no truncation), equal to what `forward` returns for them: use them for importance
    ratios. `sampling_logprobs`: log-probabilities under the distribution actually sampled
    from (after temperature, top-k, top-p): the true behaviour policy.
    """

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sampling_logprobs: list[float] | None = None


@dataclass(frozen=True)
class SampleResponse:
    """`prompt_logprobs[i]` = log p(prompt[i] | prompt[:i]) (None for i = 0), when asked for;
    `topk_prompt_logprobs[i]` = the k most likely (token, logprob) pairs at position i."""

    sequences: Sequence[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass(frozen=True)
class SaveWeightsForSamplerResponse:
    path: str


@dataclass(frozen=True)
class SaveWeightsResponse:
    """Result of `save_state`: the tinker://<run>/weights/<name> path."""

    path: str


@dataclass(frozen=True)
class LoadWeightsResponse:
    path: str


CheckpointType: TypeAlias = Literal["training", "sampler"]


@dataclass(frozen=True)
class Checkpoint:
    checkpoint_id: str
    """"weights/<name>" or "sampler_weights/<name>"."""
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    expires_at: datetime | None = None
    """When the server deletes it (a TTL was given); None: kept until deleted."""


@dataclass(frozen=True)
class TrainingRun:
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: datetime
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None
    size_bytes: int = 0
    """Disk space used by all of the run's checkpoints."""


@dataclass(frozen=True)
class Cursor:
    offset: int
    limit: int
    total_count: int


@dataclass(frozen=True)
class TrainingRunsResponse:
    training_runs: list[TrainingRun]
    cursor: Cursor


@dataclass(frozen=True)
class CheckpointsListResponse:
    checkpoints: list[Checkpoint]
