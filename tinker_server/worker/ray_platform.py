"""The Ray platform: each model replica is one synchronous Ray actor (one call at a time, run
in the order this process sent them), reserving `num_gpus` (and CPUs, custom resources) on the
cluster. The gRPC process stays the one place where order is decided; Ray only carries cycles.

Ray is imported when this platform is chosen, never by the default local platform.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import logging
import os
import signal
import threading
from types import ModuleType
from typing import Any

from tinker_server.logs import current_format
from tinker_server.ops import Cycle, CycleReport, ModelInfo, Outcome, ResidencyStats, WorkerOptions
from tinker_server.worker.platform import NO_SIGNAL, RaySettings, Replica, WorkerDied

log = logging.getLogger(__name__)
PING_SECONDS = 10.0
"""How long an idle replica may take to answer before it counts as gone."""
STOP_SECONDS = 10.0
"""The longest a stopping replica's actor is given to write its pending snapshots (a cycle under
way finishes first), as a stopping worker process is."""


class ReplicaActor:
    """Runs inside the actor's process: the engine, and its cycles."""

    def __init__(
        self, base_model: str | None, options: WorkerOptions, threads: int, log_level: int, log_format: str
    ) -> None:
        import torch

        from tinker_server.logs import configure_logging
        from tinker_server.worker.main import build_engine, prepare_process

        configure_logging(log_level, log_format)
        torch.set_num_threads(threads)  # the CPUs the actor reserved, not every core of the node
        device = prepare_process()
        self._engine = build_engine(base_model, options, device)
        self._decode_seconds = options.decode_chunk_seconds

    def info(self) -> ModelInfo:
        return self._engine.info()

    def run_cycle(self, cycle: Cycle) -> CycleReport:
        return CycleReport(self._engine.run_cycle(cycle, self._decode_seconds), self._engine.residency.stats())

    def finish_writes(self) -> None:
        self._engine.finish_writes()

    def ping(self) -> bool:
        return True

    def location(self) -> str:
        import ray

        context = ray.get_runtime_context()
        return f"ray node {context.get_node_id()} actor {context.get_actor_id()} pid {os.getpid()}"


class RayReplica:
    def __init__(self, ray: ModuleType, handle: Any) -> None:
        self._ray = ray
        self._handle = handle
        self._gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        self._location = "ray actor (starting)"
        self.residency = ResidencyStats()
        self.work_waiting = NO_SIGNAL

    async def start(self) -> ModelInfo:
        try:
            info = await self._handle.info.remote()
            self._location = await self._handle.location.remote()
            return info
        except self._gone as error:
            raise RuntimeError(f"the replica's actor could not load the base model: {error}") from error

    async def run_cycle(self, cycle: Cycle) -> list[Outcome]:
        try:
            report: CycleReport = await self._handle.run_cycle.remote(cycle)
        except self._gone as error:
            raise WorkerDied(f"the replica's Ray actor died ({type(error).__name__})") from error
        self.residency = report.residency
        return report.outcomes

    async def is_alive(self) -> bool:
        try:
            return await asyncio.wait_for(self._handle.ping.remote(), PING_SECONDS)
        except (*self._gone, TimeoutError):
            return False

    def where(self) -> str:
        return self._location

    async def stop(self) -> None:
        """Lets the actor write its pending snapshots' files (as a stopping worker process does), then ends it."""
        with contextlib.suppress(*self._gone, TimeoutError):  # a lost or stuck actor has nothing more to give
            await asyncio.wait_for(self._handle.finish_writes.remote(), STOP_SECONDS)
        self._ray.kill(self._handle, no_restart=True)


class RayPlatform:
    name = "ray"

    def __init__(self, settings: RaySettings) -> None:
        address = settings.cluster_address()
        self._settings = settings
        self._ray = _connect(address)
        self._actor = self._ray.remote(ReplicaActor)
        nodes = [node for node in self._ray.nodes() if node["Alive"]]
        log.info(
            "joined the Ray cluster at %s: %d node(s), resources %s", address, len(nodes), self._ray.cluster_resources()
        )

    def replica(self, base_model: str | None, options: WorkerOptions) -> Replica:
        settings = self._settings
        handle = self._actor.options(
            num_gpus=settings.gpus_per_replica,
            num_cpus=settings.cpus_per_replica,
            resources=settings.resources_per_replica,
            max_restarts=0,  # the server restarts replicas itself, restoring their runs
            max_concurrency=1,  # synchronous: calls run one at a time, in the order sent
        ).remote(
            base_model,
            options,
            max(1, int(settings.cpus_per_replica)),
            logging.getLogger().getEffectiveLevel(),
            current_format(),
        )
        return RayReplica(self._ray, handle)

    def has_room(self) -> bool:
        free = self._ray.available_resources()
        wanted = {"GPU": self._settings.gpus_per_replica, "CPU": self._settings.cpus_per_replica}
        wanted |= self._settings.resources_per_replica
        return all(free.get(name, 0.0) >= amount for name, amount in wanted.items() if amount > 0)

    def describe(self) -> str:
        settings = self._settings
        return (
            f"ray (one actor per replica: {settings.gpus_per_replica:g} GPU, {settings.cpus_per_replica:g} CPU"
            + "".join(f", {amount:g} {name}" for name, amount in settings.resources_per_replica.items())
            + ")"
        )

    def close(self) -> None:
        self._ray.shutdown()


def _connect(address: str) -> ModuleType:
    """Joins the cluster at `address` ("local": starts a private one)."""
    host = address.rsplit(":", 1)[0]
    if address != "local" and _is_loopback(host):
        # A cluster on this machine's loopback (tests, demos): Ray would otherwise rewrite 127.0.0.1
        # to the machine's external address, which a firewalled or sandboxed host cannot reach.
        # Read when ray is imported, hence set before.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        ray = importlib.import_module("ray")
    except ImportError as error:
        raise RuntimeError(f"--platform ray: {error}; install the extra: pip install '.[ray]'") from error
    private = {"include_dashboard": False} if address == "local" else {}
    # ray.init replaces the SIGTERM handler (with one raising SystemExit wherever the event loop
    # happens to be) and its core worker's C++ crash handler takes SIGTERM too: the server's own
    # handler, installed by serve(), is put back so SIGTERM stops it gracefully, not with an abort.
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    ray.init(address=address, logging_level=logging.WARNING, **private)
    for signum, handler in handlers.items():
        if handler is not None:  # None: installed outside Python, cannot be put back
            signal.signal(signum, handler)
    return ray


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
