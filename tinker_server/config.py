"""Server options, one place: the CLI fills them, the server reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tinker_server.api.requests import Limits
from tinker_server.auth import ApiKeys
from tinker_server.fleet import ModelSpec
from tinker_server.ops import WorkerOptions
from tinker_server.scheduler import DEFAULT_MAX_CYCLE_TOKENS, CyclePolicy
from tinker_server.worker.platform import RaySettings


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    models: tuple[ModelSpec, ...] = (ModelSpec(),)
    """The base models served, each with its replicas; by default the embedded model, once."""
    platform: str = "local"
    """Where replicas run: local (spawned processes) or ray (actors on a Ray cluster)."""
    ray: RaySettings = field(default_factory=RaySettings)
    max_runs_per_replica: int = 1024
    """Live training runs one replica takes; a new run goes to the least loaded one with room."""
    data_dir: Path = Path("tinker-data")
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    """How the worker runs the base model: dtype, tokens per pass, activation checkpointing."""
    cycle: CyclePolicy = field(default_factory=CyclePolicy)
    max_cycle_tokens: int = DEFAULT_MAX_CYCLE_TOKENS
    """A cycle's size cap, so one tenant's backlog cannot stall everyone's next cycle."""
    limits: Limits = field(default_factory=Limits)
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys({}, open=True))
    admin_owners: frozenset[str] = frozenset()
    """Owners whose keys may call the AdminService (everyone, when the server runs without keys)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    shutdown_grace_seconds: float = 10.0
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0 picks a free one); None: off."""
    console_port: int | None = None
    """Serve the web console on this port (0 picks a free one); None: off."""
    console_url: str = ""
    """The console's public base URL, as clients are told it; empty: http://<host>:<console port>."""
    result_retention_seconds: float = 3600.0
    """How long completed requests' results stay retrievable by future_id."""
    sweep_interval_seconds: float = 10.0
    """How often expired checkpoints and results are deleted."""

    def describe(self) -> str:
        """Every setting, for the start-up log; API keys appear only as a count of owners."""
        settings = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("api_keys", "limits", "worker", "ray") and (name != "ray" or self.platform == "ray")
        }
        settings |= {f"limits.{name}": value for name, value in vars(self.limits).items()}
        settings |= {f"worker.{name}": value for name, value in vars(self.worker).items()}
        settings["api_keys"] = (
            "open (no auth)" if self.api_keys.open else f"{len(set(self.api_keys.owners.values()))} owner(s)"
        )
        return ", ".join(f"{name}={value}" for name, value in settings.items())
