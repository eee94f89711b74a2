"""Prometheus metrics of the server process, served over HTTP with --metrics-port."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tinker_server.ops import ResidencyStats

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "tinker_requests", "Requests answered, by operation and gRPC status", ["operation", "status"], registry=REGISTRY
)
QUEUE_DEPTH = Gauge("tinker_queue_depth", "Requests queued and not yet in a cycle", registry=REGISTRY)
CYCLE_SECONDS = Histogram(
    "tinker_cycle_seconds",
    "Wall time of one clock cycle on the worker",
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CYCLE_REQUESTS = Histogram(
    "tinker_cycle_requests",
    "Requests batched into one cycle",
    registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
TOKENS = Counter(
    "tinker_tokens",
    "Tokens through the model (forward/backward and sampling); rate() gives tokens/s",
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter("tinker_worker_restarts", "Worker processes replaced after a crash", registry=REGISTRY)
ADAPTERS = Gauge(
    "tinker_adapters",
    "The worker's adapters by where they are: resident_runs, resident_snapshots, offloaded",
    ["where"],
    registry=REGISTRY,
)
ADAPTER_BYTES = Gauge(
    "tinker_adapter_bytes",
    "Bytes of adapters on the device, in host memory, spilled to disk",
    ["where"],
    registry=REGISTRY,
)
ADAPTER_MOVES = Gauge(
    "tinker_adapter_moves",
    "Adapters moved off the device (offloads) and back (reloads) so far",
    ["move"],
    registry=REGISTRY,
)


def watch_residency(residency: Callable[[], ResidencyStats]) -> None:
    """The adapter gauges read the worker's latest report when scraped."""
    for where in ("resident_runs", "resident_snapshots", "offloaded"):
        ADAPTERS.labels(where).set_function(lambda where=where: getattr(residency(), where))
    for where, field in (("device", "device_bytes"), ("host", "host_bytes"), ("disk", "spilled_bytes")):
        ADAPTER_BYTES.labels(where).set_function(lambda field=field: getattr(residency(), field))
    for move in ("offloads", "reloads"):
        ADAPTER_MOVES.labels(move).set_function(lambda move=move: getattr(residency(), move))


def serve_metrics(host: str, port: int) -> int:
    """Starts the /metrics endpoint in a thread; returns its port (port 0 picks a free one)."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_port
