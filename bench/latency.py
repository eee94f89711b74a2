"""Submission latency: time from a call to its ack on an idle server, and acks per second
on one stream."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.common import batch, emit, server


async def measure(training, calls: int, burst: int, window: int) -> dict:
    data = batch(1, 8, seed=0)
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        future = await training.forward_async(data, "cross_entropy")  # returns at the ack
        latencies.append(time.perf_counter() - start)
        await future  # idle again before the next call
    latencies.sort()
    # Within the server's in-flight window: beyond it the client holds requests back until
    # results free room, and this would measure the worker instead of the acks.
    burst = min(burst, window)
    start = time.perf_counter()
    await asyncio.gather(*(training.forward_async(data, "cross_entropy") for _ in range(burst)))
    acks_per_second = burst / (time.perf_counter() - start)
    return {
        "figure": "submission_latency",
        "calls": calls,
        "ack_p50_ms": round(statistics.median(latencies) * 1e3, 3),
        "ack_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 3),
        "burst": burst,
        "acks_per_s_one_stream": round(acks_per_second),
        "target": "p50 < 2 ms",
    }


def run(base_model: str | None, calls: int, burst: int) -> dict:
    with server(base_model) as client:
        name = client.get_server_capabilities().supported_models[0].model_name
        training = client.create_lora_training_client(name, rank=8, seed=0).result()
        window = client.get_server_capabilities().max_inflight_requests
        result = asyncio.run(measure(training, calls, burst, window))
    return {"benchmark": "latency", "results": [result]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--burst", type=int, default=500, help="requests sent at once (capped at the server's window)")
    args = parser.parse_args(argv)
    report = run(args.base_model, args.calls, args.burst)
    emit(report, [key for key in report["results"][0] if key != "figure"])
    return report


if __name__ == "__main__":
    main()
