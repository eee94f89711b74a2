"""Where model replicas run. `local`: a spawned process on this machine (the default; it never
imports Ray). `ray`: an actor on a Ray cluster (`pip install .[ray]`, tinker_server.worker.ray_platform).

Whatever the platform, a replica runs one cycle at a time, in the order the scheduler sent them:
the gRPC process decides every order, the platform only carries cycles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol

from tinker_server.ops import Cycle, ModelInfo, Outcome, ResidencyStats, WorkerOptions


class WorkerDied(RuntimeError):
    """The replica's worker (a process, an actor) went away while the server needed it."""


class WorkSignal(Protocol):
    """Set by the scheduler when requests are queued, cleared as it forms a cycle: while it is
    clear, a worker decoding across cycles may go on past its chunk, since nothing waits for it."""

    def set(self) -> None: ...

    def clear(self) -> None: ...


class NoSignal:
    """For workers that cannot see the flag (a Ray actor on another node): chunks keep their length."""

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass


NO_SIGNAL = NoSignal()


class Replica(Protocol):
    residency: ResidencyStats
    """Where the replica's adapters are, as of its last cycle."""
    work_waiting: WorkSignal

    async def start(self) -> ModelInfo:
        """Loads the base model; raises RuntimeError saying why it could not."""

    async def run_cycle(self, cycle: Cycle) -> list[Outcome]:
        """Runs one cycle; raises WorkerDied if the worker went away."""

    async def is_alive(self) -> bool: ...

    def where(self) -> str:
        """Where it runs, for logs and the admin listing (a pid, a Ray node)."""

    async def stop(self) -> None: ...


class WorkerPlatform(Protocol):
    name: str

    def replica(self, base_model: str | None, options: WorkerOptions) -> Replica:
        """A replica of `base_model` (None: the embedded default), not started yet."""

    def has_room(self) -> bool:
        """Whether a new replica could start now (a free GPU, say), rather than wait for one."""

    def describe(self) -> str: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RaySettings:
    """How replicas run on Ray: what each one reserves on the cluster."""

    address: str | None = None
    """The cluster to join (--ray-address, else RAY_ADDRESS); "local" starts a private one-node cluster."""
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    resources_per_replica: dict[str, float] = field(default_factory=dict)
    """Custom resources each replica reserves (e.g. {"replica": 1} on nodes that declare slots)."""

    def cluster_address(self) -> str:
        """The cluster to join: `address`, else RAY_ADDRESS; never a stray one found by chance."""
        address = self.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise ValueError(
                "--platform ray: pass --ray-address HOST:PORT (or set RAY_ADDRESS) to join a cluster, "
                "or --ray-address local for a private one on this machine; a stray cluster is never joined"
            )
        return address


class LocalPlatform:
    name = "local"

    def replica(self, base_model: str | None, options: WorkerOptions) -> Replica:
        from tinker_server.worker.client import WorkerClient  # spawns processes: imported when used

        return WorkerClient(base_model, options)

    def has_room(self) -> bool:
        return True

    def describe(self) -> str:
        return "local (one spawned process per replica)"

    def close(self) -> None:
        pass


def make_platform(name: str, ray: RaySettings) -> WorkerPlatform:
    if name == "local":
        return LocalPlatform()
    if name == "ray":
        from tinker_server.worker.ray_platform import RayPlatform  # imports Ray only when it connects

        return RayPlatform(ray)
    raise ValueError(f"--platform {name!r}: expected 'local' or 'ray'")
