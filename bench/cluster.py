"""Scale-out on Ray: aggregate training throughput of N tenants on 2 replicas vs 1, measured
side by side on one two-node local Ray cluster (ray.cluster_utils on 127.0.0.1, one CPU and one
replica slot per node), plus Ray's start-up time and the memory of its own processes.

Needs the `ray` extra. On a 2-core machine the gRPC process, the client and both actors share
the two cores, so 2 replicas cannot reach 2x: the report says what they reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from bench.common import ADAM, batch, emit, running_server
from tinker_client import ServiceClient

NODE = {"num_cpus": 1, "resources": {"replica": 1}, "node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}
RAY_PROCESSES = ("gcs_server", "raylet", "log_monitor", "monitor.py", "dashboard", "runtime_env", "ray::IDLE")


def ray_rss_bytes() -> int:
    """Resident memory of Ray's own processes (not the replicas' actors), from /proc."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if any(name in command for name in RAY_PROCESSES):
                total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
    return total


async def train(service: ServiceClient, tenants: int, seconds: float, rows: int, length: int) -> int:
    """Every tenant trains (forward_backward + optim_step) until the deadline; returns the steps done."""
    name = (await service.get_server_capabilities_async()).supported_models[0].model_name
    trainings = [await service.create_lora_training_client_async(name, rank=8, seed=i) for i in range(tenants)]
    deadline = time.monotonic() + seconds

    async def tenant(training, data) -> int:
        steps = 0
        while time.monotonic() < deadline:
            backward = await training.forward_backward_async(data, "cross_entropy")
            step = await training.optim_step_async(ADAM)
            await backward
            await step
            steps += 1
        return steps

    return sum(await asyncio.gather(*(tenant(t, batch(rows, length, seed=i)) for i, t in enumerate(trainings))))


def throughput(address: str | None, replicas: int, tenants: int, seconds: float, rows: int, length: int) -> float:
    """Steps per second of `tenants` training at once; on the Ray cluster at `address`, or (None)
    on the local platform."""
    arguments = ["--replicas", str(replicas)]
    if address is not None:
        arguments += ["--platform", "ray", "--ray-address", address, "--ray-cpus-per-replica", "1"]
        arguments += ["--ray-resources-per-replica", '{"replica": 1}']
    with tempfile.TemporaryDirectory() as data_dir, running_server(Path(data_dir), arguments) as server_address:
        service = ServiceClient(base_url=server_address)
        try:
            asyncio.run(train(service, tenants, 2.0, rows, length))  # warm-up: first passes, allocations
            return asyncio.run(train(service, tenants, seconds, rows, length)) / seconds
        finally:
            service.close()


def run(tenants: int, seconds: float, rows: int, length: int) -> dict:
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    before = ray_rss_bytes()
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    startup = time.perf_counter() - started
    try:
        memory = ray_rss_bytes() - before
        one = throughput(cluster.address, 1, tenants, seconds, rows, length)
        two = throughput(cluster.address, 2, tenants, seconds, rows, length)
    finally:
        cluster.shutdown()
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread, as each Ray replica has: Ray's cost alone
    try:
        local = throughput(None, 1, tenants, seconds, rows, length)
    finally:
        del os.environ["OMP_NUM_THREADS"]
    return {
        "benchmark": "cluster",
        "results": [
            {
                "figure": "throughput",
                "tenants": tenants,
                "rows_x_length": f"{rows}x{length}",
                "steps_per_s_1_replica": round(one, 2),
                "steps_per_s_2_replicas": round(two, 2),
                "speedup": round(two / one, 2),
                "cpu_cores": os.cpu_count(),
            },
            {
                "figure": "ray_vs_local",
                "steps_per_s_local_1_replica_1_thread": round(local, 2),
                "ray_1_replica_vs_local": round(one / local, 2),
            },
            {
                "figure": "ray_overhead",
                "two_node_cluster_start_s": round(startup, 2),
                "ray_processes_rss_mib": round(memory / 2**20, 1),
            },
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args(argv)
    report = run(args.tenants, args.seconds, args.rows, args.length)
    for result in report["results"]:
        emit({"benchmark": "cluster", "results": [result]}, [key for key in result if key != "figure"])
    return report


if __name__ == "__main__":
    main()
