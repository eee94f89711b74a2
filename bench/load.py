"""Load test on loopback: N clients sending requests for a bounded time.

Reports requests completed, errors (expected 0), p50/p99 latency from call to result, and
checks that every acked request got exactly one result.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.common import batch, emit, server
from tinker_client import TinkerError, types


async def client_loop(training, data, deadline: float, stats: dict) -> None:
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            future = await training.forward_backward_async(data, "cross_entropy")
            stats["acked"] += 1
            await future
            stats["results"] += 1
            await (await training.optim_step_async(types.AdamParams(learning_rate=1e-4)))
            stats["latencies"].append(time.perf_counter() - start)
        except TinkerError as error:
            stats["errors"].append(str(error))


async def load(service, clients: int, seconds: float, rows: int, length: int) -> dict:
    name = (await service.get_server_capabilities_async()).supported_models[0].model_name
    trainings = [await service.create_lora_training_client_async(name, rank=8, seed=i) for i in range(clients)]
    stats = {"acked": 0, "results": 0, "latencies": [], "errors": []}
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(client_loop(t, batch(rows, length, seed=i), deadline, stats) for i, t in enumerate(trainings))
    )
    elapsed = time.perf_counter() - started
    latencies = sorted(stats["latencies"])
    return {
        "figure": "load",
        "clients": clients,
        "seconds": round(elapsed, 1),
        "steps_completed": len(latencies),
        "requests_completed": stats["results"] + len(latencies),
        "errors": len(stats["errors"]),
        "step_p50_ms": round(statistics.median(latencies) * 1e3, 1) if latencies else None,
        "step_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 1) if latencies else None,
        "every_ack_got_one_result": stats["acked"] == stats["results"],
    }


def run(base_model: str | None, clients: int, seconds: float, rows: int, length: int) -> dict:
    with server(base_model) as service:
        result = asyncio.run(load(service, clients, seconds, rows, length))
    return {"benchmark": "load", "results": [result]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--length", type=int, default=32)
    args = parser.parse_args(argv)
    report = run(args.base_model, args.clients, args.seconds, args.rows, args.length)
    emit(report, [key for key in report["results"][0] if key != "figure"])
    return report


if __name__ == "__main__":
    main()
