"""Server options, one place: the CLI fills them, the server reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tinker_server.api.requests import Limits
from tinker_server.auth import ApiKeys
from tinker_server.ops import WorkerOptions
from tinker_server.scheduler import DEFAULT_MAX_CYCLE_TOKENS, CyclePolicy


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    base_model: str | None = None
    """A local Hugging Face model directory; None serves the embedded default model."""
    served_model_name: str | None = None
    """The name clients use for the base model; None: the embedded model's name, or the directory."""
    data_dir: Path = Path("tinker-data")
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    """How the worker runs the base model: dtype, tokens per pass, activation checkpointing."""
    cycle: CyclePolicy = field(default_factory=CyclePolicy)
    max_cycle_tokens: int = DEFAULT_MAX_CYCLE_TOKENS
    """A cycle's size cap, so one tenant's backlog cannot stall everyone's next cycle."""
    limits: Limits = field(default_factory=Limits)
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys({}, open=True))
    tls_cert: Path | None = None
    tls_key: Path | None = None
    shutdown_grace_seconds: float = 10.0
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0 picks a free one); None: off."""
    result_retention_seconds: float = 3600.0
    """How long completed requests' results stay retrievable by future_id."""
    sweep_interval_seconds: float = 10.0
    """How often expired checkpoints and results are deleted."""

    def describe(self) -> str:
        """Every setting, for the start-up log; API keys appear only as a count of owners."""
        settings = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("api_keys", "limits", "worker")
        }
        settings |= {f"limits.{name}": value for name, value in vars(self.limits).items()}
        settings |= {f"worker.{name}": value for name, value in vars(self.worker).items()}
        settings["api_keys"] = (
            "open (no auth)" if self.api_keys.open else f"{len(set(self.api_keys.owners.values()))} owner(s)"
        )
        return ", ".join(f"{name}={value}" for name, value in settings.items())
