"""What the server keeps and reports: its capabilities, runs, checkpoints, sessions, samplers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeAlias

from tinker_client.types.training import AdamOptimizerConfig, OptimizerConfig

CheckpointType: TypeAlias = Literal["training", "sampler", "external"]
_PATH_SEGMENTS: dict[str, CheckpointType] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


@dataclass(frozen=True)
class SupportedModel:
    model_name: str | None = None
    max_context_length: int | None = None
    trainable: bool | None = None
    sampleable: bool | None = None
    vocab_size: int | None = None


@dataclass(frozen=True)
class AdapterResidency:
    """Where the server's adapters are: a bounded number on its device, the others waiting
    (exactly) in host memory or on disk."""

    resident_runs: int = 0
    resident_snapshots: int = 0
    offloaded: int = 0
    device_bytes: int = 0
    host_bytes: int = 0
    spilled_bytes: int = 0
    offloads: int = 0
    reloads: int = 0


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
    residency: AdapterResidency | None = None


@dataclass(frozen=True)
class Checkpoint:
    checkpoint_id: str
    """"weights/<name>" or "sampler_weights/<name>"."""
    checkpoint_type: CheckpointType
    time: datetime
    tinker_path: str
    size_bytes: int | None = None
    public: bool = False
    """Readable by every API key of the server (publish_checkpoint_from_tinker_path)."""
    user_metadata: dict[str, str] | None = None
    expires_at: datetime | None = None
    """When the server deletes it (a TTL was given); None: kept until deleted."""


@dataclass(frozen=True)
class ParsedCheckpointTinkerPath:
    tinker_path: str
    training_run_id: str
    checkpoint_type: CheckpointType
    checkpoint_id: str

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        """Splits tinker://<run>/<weights|sampler_weights>/<name>; raises ValueError."""
        parts = tinker_path.removeprefix("tinker://").split("/") if tinker_path.startswith("tinker://") else []
        if len(parts) != 3 or parts[1] not in _PATH_SEGMENTS:
            raise ValueError(f"Invalid tinker path: {tinker_path}")
        return cls(tinker_path, parts[0], _PATH_SEGMENTS[parts[1]], "/".join(parts[1:]))


@dataclass(frozen=True)
class TrainingRun:
    training_run_id: str
    base_model: str
    model_owner: str
    is_lora: bool
    last_request_time: datetime
    corrupted: bool = False
    lora_rank: int | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None
    user_metadata: dict[str, str] | None = None
    size_bytes: int = 0
    """Disk space used by all of the run's checkpoints."""
    session_id: str | None = None
    project_id: str | None = None


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
    cursor: Cursor | None = None


@dataclass(frozen=True)
class ExternalWeightsUrlsResponse:
    urls: dict[str, str]
    """A URL per file (a plain HTTP GET fetches it), by its path within the checkpoint."""
    expires: datetime
    """When the URLs stop working; ask again for new ones."""


@dataclass(frozen=True)
class WeightsInfoResponse:
    """What loading a checkpoint needs to know."""

    base_model: str
    is_lora: bool
    optimizer_config: OptimizerConfig = AdamOptimizerConfig()
    lora_rank: int | None = None
    train_unembed: bool | None = None
    train_mlp: bool | None = None
    train_attn: bool | None = None


@dataclass(frozen=True)
class GetSamplerResponse:
    sampler_id: str
    base_model: str
    model_path: str | None = None


@dataclass(frozen=True)
class WhoamiResponse:
    user_urn: str
    """urn:tinker-grpc:owner:<owner>, the owner of the API key."""
    org_urn: str
    """This server: urn:tinker-grpc:server (a self-hosted server has no organisations)."""
    email: str | None = None


@dataclass(frozen=True)
class GetSessionResponse:
    training_run_ids: list[str]
    sampler_ids: list[str]
    user_metadata: dict[str, str] | None = None
    display_name: str | None = None


@dataclass(frozen=True)
class ListSessionsResponse:
    sessions: list[str]


@dataclass(frozen=True)
class CurrentCheckpointStorageUsageItem:
    checkpoint_count: int
    size_bytes: int
    size_gigabytes: float
    project_id: str | None = None
    org_user_urn: str | None = None
    user_email: str | None = None
    user_name: str | None = None
    estimated_monthly_cost_usd: float | None = None


@dataclass(frozen=True)
class CurrentCheckpointStorageUsageResponse:
    data: list[CurrentCheckpointStorageUsageItem]
    effective_rate_usd_per_gigabyte_month: float | None = None
    """A self-hosted server charges nothing: always None."""
