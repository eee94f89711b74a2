"""The messages between the scheduler and the worker process: operations, cycles, outcomes.

Plain dataclasses of numpy arrays and scalars, so they pickle as raw buffers over the
worker pipe and import no torch.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import ClassVar, TypeAlias

import numpy as np


class Phase(enum.IntEnum):
    """Order of the stages inside one clock cycle."""

    CREATE = 0
    FORWARD = 1
    OPTIM = 2
    SAVE = 3
    SAMPLE = 4


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    seed: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    alpha: float


@dataclass(frozen=True)
class AdamConfig:
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


@dataclass
class DatumArrays:
    """One datum, validated: int64 tokens [N] and named loss inputs."""

    tokens: np.ndarray
    loss_fn_inputs: dict[str, np.ndarray]


@dataclass
class CreateAdapter:
    """A new adapter: seeded from `lora`, or loaded from a checkpoint directory."""

    phase: ClassVar[Phase] = Phase.CREATE
    lora: LoraSpec
    source_dir: str | None = None
    with_optimizer: bool = False
    with_gradients: bool = False
    """Also the gradients no step consumed yet (a run moving between replicas)."""


@dataclass
class LoadState:
    """Replaces the adapter's weights (and optionally its optimizer state) from a checkpoint, or
    (no `source_dir`) with its initial weights, rebuilt from its seed, and a fresh optimizer."""

    phase: ClassVar[Phase] = Phase.CREATE
    source_dir: str | None
    with_optimizer: bool


@dataclass
class ForwardBackward:
    phase: ClassVar[Phase] = Phase.FORWARD
    data: list[DatumArrays]
    loss_fn: str
    loss_fn_config: dict[str, float]
    backward: bool


@dataclass
class OptimStep:
    phase: ClassVar[Phase] = Phase.OPTIM
    adam: AdamConfig


@dataclass
class SaveForSampler:
    phase: ClassVar[Phase] = Phase.SAVE
    path: str
    """tinker://<model_id>/sampler_weights/<name>; also the snapshot's adapter name."""
    directory: str
    """Where the snapshot is written in peft's format."""
    ephemeral: bool = False
    """An unnamed save: usable at once, its files written in the background."""
    base_model: str = ""
    """What adapter_config.json names the base model (see `named_base_model`)."""


@dataclass
class SaveState:
    """Writes the adapter and its optimizer state (a `training` checkpoint)."""

    phase: ClassVar[Phase] = Phase.SAVE
    path: str
    directory: str
    with_gradients: bool = False
    """Also the gradients no step consumed yet, so a run moving between replicas loses nothing."""
    base_model: str = ""
    """What adapter_config.json names the base model (see `named_base_model`)."""


@dataclass
class SaveExternal:
    """Writes the adapter in peft's format for use elsewhere (an `external` checkpoint), each
    file encrypted to `age_recipients` where there are any."""

    phase: ClassVar[Phase] = Phase.SAVE
    path: str
    directory: str
    base_model: str = ""
    """What adapter_config.json names the base model (see `named_base_model`)."""
    age_recipients: tuple[str, ...] = ()


def named_base_model(operation: SaveForSampler | SaveState | SaveExternal, own_name: str) -> str:
    """The name a saved adapter gives its base model: the one clients know it by (its served name,
    which the server puts in the save: where the adapter goes, that name loads the base model),
    else the worker's own (`own_name`: a local path, or the embedded model's name)."""
    return operation.base_model or own_name


@dataclass
class DeleteCheckpoint:
    phase: ClassVar[Phase] = Phase.SAVE
    path: str
    directory: str


@dataclass
class Unload:
    """Frees a run's adapter (its weights, gradients and optimizer state) wherever it is, after
    writing out its snapshots whose files were still pending (another replica may read them next)."""

    phase: ClassVar[Phase] = Phase.SAVE


@dataclass
class Sample:
    phase: ClassVar[Phase] = Phase.SAMPLE
    adapter: str | None
    """A sampler path, or None for the bare base model."""
    adapter_dir: str | None
    """Where the sampler weights are on disk, loaded on first use (e.g. after a restart)."""
    prompt: np.ndarray
    num_samples: int
    params: SamplingConfig
    include_prompt_logprobs: bool
    topk_prompt_logprobs: int
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: np.ndarray | None = None
    """int64 [P-1, K] token ids to score at prompt positions 1..P-1; -1 asks for nothing."""
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    """Score only the last N prompt positions in the prompt logprobs and their top k."""


Operation: TypeAlias = (
    CreateAdapter
    | LoadState
    | ForwardBackward
    | OptimStep
    | SaveForSampler
    | SaveState
    | SaveExternal
    | DeleteCheckpoint
    | Unload
    | Sample
)


@dataclass
class WorkItem:
    future_id: str
    model_id: str
    """The adapter a training operation acts on; empty for sampling."""
    operation: Operation


def reads_only(operation: Operation) -> bool:
    """Changes no run's state (a forward, a sample): safe to run again."""
    return isinstance(operation, Sample) or (isinstance(operation, ForwardBackward) and not operation.backward)


def run_of(item: WorkItem) -> str:
    """The training run an item reads or changes: its model_id, or for an in-flight sample the run
    whose live weights it reads ('' for samples of saved weights or of the base model)."""
    operation = item.operation
    if isinstance(operation, Sample) and operation.adapter is not None and operation.adapter_dir is None:
        return operation.adapter
    return item.model_id


def home_run(item: WorkItem) -> str:
    """The run whose replica an item must run on: run_of, or for a sample of saved weights the run
    that saved them (its replica holds them); '' for the bare base model."""
    operation = item.operation
    if isinstance(operation, Sample) and operation.adapter is not None:
        return operation.adapter.removeprefix("tinker://").partition("/")[0]
    return item.model_id


@dataclass
class Cycle:
    cycle_id: int
    items: list[WorkItem]


@dataclass(frozen=True)
class OpError:
    code: int
    """grpc.StatusCode value[0] (the google.rpc.Code number)."""
    message: str


@dataclass
class ForwardBackwardResult:
    loss_fn_outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


@dataclass
class OptimStepResult:
    metrics: dict[str, float]


@dataclass
class CreateAdapterResult:
    model_id: str
    lora: LoraSpec
    """The adapter as created (for one loaded from a file: what the file holds)."""
    trained_modules: tuple[str, ...] = ()
    """The weights it adapts, by path."""


@dataclass
class LoadStateResult:
    pass


@dataclass
class DeleteCheckpointResult:
    pass


@dataclass
class UnloadResult:
    pass


@dataclass
class SaveCheckpointResult:
    """For SaveForSampler, SaveState and SaveExternal."""

    path: str
    size_bytes: int


@dataclass
class SequenceArrays:
    sequence_id: str
    """Distinct for every sequence sampled; names it in provenance spans."""
    tokens: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    stopped: bool
    topk_tokens: np.ndarray | None = None
    """int32 [T, k], the most likely tokens at each generated position; None when not asked for."""
    topk_logprobs: np.ndarray | None = None


@dataclass
class PromptLogprobs:
    logprobs: np.ndarray
    """float32 [P]; NaN at 0."""
    topk_tokens: np.ndarray | None
    """int32 [P, k], -1 in row 0; None when not asked for."""
    topk_logprobs: np.ndarray | None


@dataclass
class SampleResult:
    sequences: list[SequenceArrays]
    prompt: PromptLogprobs | None = None
    target_prompt_logprobs: np.ndarray | None = None
    """float32, the shape of the request's targets; 0 where it asked for nothing."""
    prompt_alt_tokens: np.ndarray | None = None
    """int32 [P-1, k] draws at prompt positions 1..P-1; None when not asked for."""
    prompt_alt_logprobs: np.ndarray | None = None
    prompt_cache_hit_tokens: int = 0
    """Prompt tokens not prefilled for this request: another request of the batch prefilled them."""


OpResult: TypeAlias = (
    CreateAdapterResult
    | LoadStateResult
    | ForwardBackwardResult
    | OptimStepResult
    | SaveCheckpointResult
    | DeleteCheckpointResult
    | UnloadResult
    | SampleResult
)


@dataclass
class Outcome:
    """What the worker answers for one WorkItem: a result or an error."""

    future_id: str
    cycle_id: int
    result: OpResult | None = None
    error: OpError | None = None


@dataclass
class ModelInfo:
    """What the worker tells the server about its base model once it is loaded."""

    name: str
    arch: str
    vocab_size: int
    max_context_length: int
    eos_token_id: int | None
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    model_type: str = ""
    """The Hugging Face model_type, e.g. "qwen3_moe"."""
    lora_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The weights each LoRA flag ("attn", "mlp", "unembed") adapts, by path."""
    lora_unsupported: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Weights a flag covers that this server cannot adapt (the flag is refused)."""
    eos_token_ids: tuple[int, ...] = ()
    """Every id sampling stops at (unless ignore_eos): the generation config's and the tokenizer's."""


@dataclass(frozen=True)
class WorkerOptions:
    """How the worker runs its base model (server flags)."""

    dtype: str = "auto"
    """The base weights' dtype: auto (bfloat16 on a CUDA device that has it, else float32), bfloat16,
    float16 or float32. LoRA weights and their Adam state are float32 whatever it is."""
    max_tokens_per_pass: int = 16384
    """Padded tokens (rows x longest row) one forward/backward pass takes; a bigger batch runs as
    micro-batches whose gradients add up. A single longer row runs alone. Sampling prefills its
    prompts in passes of similar lengths within it too."""
    activation_checkpointing: bool = False
    """Keep no decoder layer's activations for backward; recompute them (one more forward of the decoder)."""
    max_resident_runs: int = 256
    """Training adapters resident on the device between cycles (--max-adapters); the others wait,
    exactly, in host memory or on disk."""
    max_resident_snapshot_bytes: int = 1 << 30
    """Device bytes of sampler snapshots; least recently used ones leave beyond it."""
    max_host_adapter_bytes: int = 4 << 30
    """Host memory for adapters moved off a GPU; beyond it they go to disk."""
    adapter_idle_seconds: float = 600.0
    """An adapter unused this long leaves the device for disk."""
    spill_dir: str | None = None
    """Where offloaded training adapters are written (the server's data dir /spill)."""
    decode_chunk_seconds: float = 0.015
    """How long a cycle decodes before it answers: generations go on over the next cycles, so
    training requests never wait behind a whole generation, only behind one chunk of it."""
    kv_cache_bytes: int = 0
    """Device bytes for generations' keys and values, and for prompts kept for reuse: requests
    wait while what runs leaves no room for theirs. 0: half the GPU memory still free once the
    model is loaded, or 4 GiB on a CPU."""


@dataclass(frozen=True)
class ResidencyStats:
    """Where the worker's adapters are, and how often they moved."""

    resident_runs: int = 0
    resident_snapshots: int = 0
    offloaded: int = 0
    """Adapters off the device (in host memory or on disk)."""
    device_bytes: int = 0
    host_bytes: int = 0
    spilled_bytes: int = 0
    """Training adapters written to the worker's spill directory."""
    offloads: int = 0
    reloads: int = 0
    offloaded_runs: tuple[str, ...] = ()
    """The training runs among the offloaded adapters, by model_id."""

    def counts(self) -> dict[str, int]:
        """Every number above, by name."""
        return {name: value for name, value in asdict(self).items() if name != "offloaded_runs"}

    def __add__(self, other: ResidencyStats) -> ResidencyStats:
        """Two workers' adapters together."""
        mine, theirs = self.counts(), other.counts()
        return ResidencyStats(
            **{name: mine[name] + theirs[name] for name in mine},
            offloaded_runs=self.offloaded_runs + other.offloaded_runs,
        )


@dataclass
class CycleReport:
    """The worker's answer to a cycle: an outcome per item, and where its adapters are now."""

    outcomes: list[Outcome]
    residency: ResidencyStats
