"""Server lifecycle: start the worker, the scheduler and the gRPC server; stop them cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tinker_rpc.v1 import admin_pb2, admin_pb2_grpc, runs_pb2, runs_pb2_grpc, service_pb2, service_pb2_grpc
from tinker_server import metrics, ops
from tinker_server.api.admin_servicer import AdminServicer
from tinker_server.api.dispatch import Dispatcher
from tinker_server.api.interceptors import AuthInterceptor, LoggingInterceptor
from tinker_server.api.requests import ParsedRequest, RequestParser
from tinker_server.api.runs_servicer import RunsServicer
from tinker_server.api.servicer import TinkerServicer
from tinker_server.config import ServerConfig
from tinker_server.console.app import Console
from tinker_server.console.queries import ConsoleQueries
from tinker_server.console.sessions import Sessions
from tinker_server.files import remove_staging_leftovers
from tinker_server.fleet import Fleet, FleetOptions
from tinker_server.metrics import serve_metrics
from tinker_server.runs import Runs
from tinker_server.served import ServedModels
from tinker_server.store import CheckpointPath, RestorePoint, Store
from tinker_server.worker.platform import make_platform

log = logging.getLogger(__name__)
AUTOSAVE_NAME = "autosave-shutdown"
SERVED = (
    service_pb2.DESCRIPTOR.services_by_name["TinkerService"].full_name,
    runs_pb2.DESCRIPTOR.services_by_name["RunsService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


class TinkerServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._fleet: Fleet | None = None
        self._servicer: TinkerServicer | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._store: Store | None = None
        self._console: Console | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Binds and starts the gRPC server, health NOT_SERVING; `boot` loads the model."""
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        remove_staging_leftovers(config.data_dir)
        self._store = Store(config.data_dir / "tinker.db")
        runs = Runs(self._store, config.data_dir)
        self._served = ServedModels()
        self._health = health.aio.HealthServicer()
        self._restarting = 0
        await self._set_serving(False)
        fleet_options = FleetOptions(
            config.worker,
            config.cycle,
            config.max_cycle_tokens,
            config.max_runs_per_replica,
            config.sweep_interval_seconds,
        )
        self._fleet = Fleet(make_platform(config.platform, config.ray), fleet_options, runs, self._worker_serving)
        self._runs = runs
        self._dispatcher = Dispatcher(self._fleet, runs, config.limits, config.result_retention_seconds)
        self._dispatcher.answer_lost_requests()
        self._fleet.gate = self._dispatcher.gate
        parser = RequestParser(self._served, runs, config.limits)
        metrics.watch_residency(self._fleet.residency)
        if config.console_port is not None:
            self._console = Console(
                ConsoleQueries(runs, self._fleet), Sessions(config.api_keys, config.admin_owners), config.console_url
            )
            await self._console.start(config.host, config.console_port)
        self._servicer = TinkerServicer(
            self._served, runs, parser, self._dispatcher, config.limits, self._fleet.residency, self.console_url
        )
        options = [
            ("grpc.max_receive_message_length", config.limits.max_message_bytes),
            ("grpc.max_send_message_length", config.limits.max_message_bytes),
        ]
        self._grpc = grpc.aio.server(
            options=options, interceptors=[LoggingInterceptor(), AuthInterceptor(config.api_keys)]
        )
        service_pb2_grpc.add_TinkerServiceServicer_to_server(self._servicer, self._grpc)
        runs_servicer = RunsServicer(self._served, runs, parser, self._dispatcher, self._console)
        runs_pb2_grpc.add_RunsServiceServicer_to_server(runs_servicer, self._grpc)
        admin_servicer = AdminServicer(self._fleet, config.api_keys, config.admin_owners)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin_servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        reflection.enable_server_reflection([*SERVED, health.SERVICE_NAME, reflection.SERVICE_NAME], self._grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())])
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {config.host}:{config.port}")
        await self._grpc.start()
        if config.api_keys.open:
            log.warning(
                "AUTHENTICATION IS OFF (--allow-unauthenticated): anyone who can reach this port "
                "can train, sample, and read or delete every run and checkpoint"
            )
        else:
            log.info("API keys for %d owner(s)", len(set(config.api_keys.owners.values())))

    @property
    def console_url(self) -> str:
        """The web console's base URL; empty when it is off."""
        return self._console.url if self._console is not None else ""

    async def boot(self) -> None:
        """Starts every replica (loading the base models), then serves: health SERVING."""
        config = self.config
        models = await self._fleet.start(list(config.models))
        self._served.set(models)
        self._tasks = [
            asyncio.create_task(
                _every(config.sweep_interval_seconds, self._dispatcher.sweep), name="checkpoint-sweeper"
            ),
        ]
        await self._set_serving(True)
        log.info(
            "serving %s on %s:%d with %s (%s, cycle=%s, data dir %s, store schema v%d)",
            ", ".join(f"{name} x{sum(s.base_model == name for s in self._fleet.statuses())}" for name in models),
            config.host,
            self.port,
            self._fleet.platform.describe(),
            "TLS" if config.tls_cert else "plaintext",
            config.cycle,
            config.data_dir,
            self._store.schema_version,
        )

    async def _worker_serving(self, serving: bool) -> None:
        """Health is NOT_SERVING while any replica restarts and brings its runs back."""
        self._restarting += -1 if serving else 1
        await self._set_serving(self._restarting == 0)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *SERVED):
            await self._health.set(service, status)

    async def stop(self) -> None:
        """Graceful: refuse new requests, run what was queued, save every live run's state,
        then close. Bounded by shutdown_grace_seconds (plus the worker's own stop)."""
        grace = self.config.shutdown_grace_seconds
        if self._servicer is not None and self._tasks:
            await self._set_serving(False)
            self._dispatcher.draining = True
            await self._fleet.drain_queues(grace)
            await self._autosave(grace)
        if self._grpc is not None:
            await self._grpc.stop(1.0)  # results already queued on the streams go out first
        if self._console is not None:
            await self._console.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._fleet is not None:
            await self._fleet.stop()
        if self._store is not None:
            self._store.close()
        log.info("server stopped")

    async def _autosave(self, timeout: float) -> None:
        """Saves every live run as tinker://<run>/weights/autosave-shutdown, so none loses work."""
        saves = []
        for run in self._runs.live_runs():
            path = CheckpointPath(run.model_id, "training", AUTOSAVE_NAME)
            save = ops.SaveState(str(path), str(self._runs.directory(path)), base_model=run.base_model)
            item = ops.WorkItem("", run.model_id, save)
            parsed = ParsedRequest(run.model_id, item, checkpoint=path, restore=RestorePoint(str(path), True))
            saves.append(self._dispatcher.submit(parsed, run.owner, internal=True).result)
        if saves:
            done, _ = await asyncio.wait(saves, timeout=timeout)
            log.info("saved %d of %d live run(s) as %s", len(done), len(saves), AUTOSAVE_NAME)


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:  # a failed sweep is retried next time; it must not stop the loop
            log.exception("periodic %s failed", job.__name__)


async def serve(config: ServerConfig) -> None:
    """Runs until SIGINT or SIGTERM, then stops the server and its worker."""
    server = TinkerServer(config)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_requested.set)
    log.info("configuration: %s", config.describe())
    try:
        await server.start()
        if config.metrics_port is not None:
            port = serve_metrics(config.host, config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", config.host, port)
        if server.console_url:
            log.info("console on %s", server.console_url)
        # Machine-readable lines, so scripts and tests can find an ephemeral port: the first
        # while the model loads (health NOT_SERVING), the second once requests are served.
        print(f"tinker-server bound on {config.host}:{server.port}", flush=True)
        await server.boot()
        print(f"tinker-server listening on {config.host}:{server.port}", flush=True)
        await stop_requested.wait()
        log.info("shutting down")
    finally:
        await server.stop()
