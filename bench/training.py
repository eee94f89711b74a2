"""Training throughput: the service against plain torch+peft, and many tenants against one.

1. Service overhead: seconds per forward_backward + optim_step through the service, divided
   by the same step in an in-process torch+peft loop on the same model and batch.
2. Multi-tenant gain: 8 clients training at once through one server vs the same 8 trainings
   one after another (aggregate tokens/s ratio), beside the ceiling measured here: what plain
   torch gains from running the same rows as one batch instead of 8.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from bench.common import ADAM, batch, emit, peft_trainer, seconds_per_call, server, torch_step


def service_overhead(base_model: str | None, rows: int, length: int, steps: int, rank: int) -> dict:
    data = batch(rows, length, seed=0)
    model, optimizer = peft_trainer(base_model, rank)
    with server(base_model) as client:
        name = client.get_server_capabilities().supported_models[0].model_name
        training = client.create_lora_training_client(name, rank=rank, seed=0).result()

        def service_step() -> None:
            backward = training.forward_backward(data, "cross_entropy")
            training.optim_step(ADAM).result()
            backward.result()

        # Interleaved repeats: both sides see the same machine noise.
        service_times, torch_times = [], []
        for _ in range(3):
            service_times.append(seconds_per_call(service_step, steps))
            torch_times.append(seconds_per_call(lambda: torch_step(model, optimizer, data), steps))
    service_s, torch_s = min(service_times), min(torch_times)
    return {
        "figure": "service_overhead",
        "batch": f"{rows}x{length}",
        "service_ms_per_step": round(service_s * 1e3, 2),
        "torch_peft_ms_per_step": round(torch_s * 1e3, 2),
        "ratio": round(service_s / torch_s, 3),
        "target": "<= 1.10",
    }


def multi_tenant(base_model: str | None, tenants: int, rows: int, length: int, steps: int, rank: int) -> dict:
    datasets = [batch(rows, length, seed=tenant) for tenant in range(tenants)]
    tokens = tenants * rows * length * steps

    # The ceiling: plain torch running the 8 tenants' rows as 8 batches vs one batch.
    model, optimizer = peft_trainer(base_model, rank)
    separate = seconds_per_call(lambda: [torch_step(model, optimizer, data) for data in datasets], steps)
    merged = seconds_per_call(lambda: torch_step(model, optimizer, [d for data in datasets for d in data]), steps)
    ceiling = separate / merged

    with server(base_model) as client:
        name = client.get_server_capabilities().supported_models[0].model_name
        trainings = [client.create_lora_training_client(name, rank=rank, seed=t).result() for t in range(tenants)]

        def train(training, data) -> None:
            for _ in range(steps):
                backward = training.forward_backward(data, "cross_entropy")
                training.optim_step(ADAM).result()
                backward.result()

        for training, data in zip(trainings, datasets, strict=True):  # warm-up
            train(training, data)
        start = time.perf_counter()
        for training, data in zip(trainings, datasets, strict=True):
            train(training, data)
        sequential = time.perf_counter() - start

        threads = [threading.Thread(target=train, args=pair) for pair in zip(trainings, datasets, strict=True)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent = time.perf_counter() - start
    gain = sequential / concurrent
    return {
        "figure": "multi_tenant_gain",
        "batch": f"{tenants} tenants x {rows}x{length}",
        "sequential_tokens_per_s": round(tokens / sequential),
        "concurrent_tokens_per_s": round(tokens / concurrent),
        "gain": round(gain, 3),
        "torch_ceiling": round(ceiling, 3),
        "fraction_of_ceiling": round(gain / ceiling, 3),
        "target": ">= 0.85",
    }


def run(
    base_model: str | None,
    rows: int,
    length: int,
    tenants: int,
    tenant_rows: int,
    tenant_length: int,
    steps: int,
    rank: int,
) -> dict:
    torch.manual_seed(0)
    return {
        "benchmark": "training",
        "threads": torch.get_num_threads(),
        "results": [
            service_overhead(base_model, rows, length, steps, rank),
            multi_tenant(base_model, tenants, tenant_rows, tenant_length, steps, rank),
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="local HF directory (default: the embedded model)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--tenant-rows", type=int, default=2)
    parser.add_argument("--tenant-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    report = run(
        args.base_model,
        args.rows,
        args.length,
        args.tenants,
        args.tenant_rows,
        args.tenant_length,
        args.steps,
        args.rank,
    )
    for result in report["results"]:
        emit({"benchmark": f"training: {result['figure']}", "results": [result]}, [k for k in result if k != "figure"])
    return report


if __name__ == "__main__":
    main()
