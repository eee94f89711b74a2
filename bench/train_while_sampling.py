"""Training latency while a long generation runs: `forward_backward` (with its `optim_step`) of
one tenant, idle and while another tenant samples 8 x 512 tokens, side by side in one run.

Goal: p99 while sampling at most 2x the idle p99.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench.common import ADAM, batch, emit, server
from tinker_client import types


def step_latencies(training, data, count: int, keep_going: threading.Event | None = None) -> list[float]:
    latencies = []
    while len(latencies) < count and (keep_going is None or keep_going.is_set()):
        start = time.perf_counter()
        backward = training.forward_backward(data, "cross_entropy")
        training.optim_step(ADAM).result()
        backward.result()
        latencies.append(time.perf_counter() - start)
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1e3, ordered[int(0.99 * (len(ordered) - 1))] * 1e3


def run(base_model: str | None, steps: int, generation_tokens: int) -> dict:
    with server(base_model) as service:
        name = service.get_server_capabilities().supported_models[0].model_name
        training = service.create_lora_training_client(name, rank=8, seed=0).result()
        sampler = service.create_sampling_client(base_model=name).result()
        data = batch(4, 64, seed=0)
        step_latencies(training, data, 3)  # warm-up
        idle = step_latencies(training, data, steps)

        sampling = threading.Event()
        sampling.set()
        params = types.SamplingParams(max_tokens=generation_tokens, temperature=1.0, stop=[])
        started = time.perf_counter()
        generation = sampler.sample(types.ModelInput.from_ints(list(range(40, 56))), 8, params)
        generation.future().add_done_callback(lambda _: sampling.clear())
        busy = step_latencies(training, data, steps, keep_going=sampling)
        generated = generation.result()
        generation_seconds = time.perf_counter() - started
    idle_p50, idle_p99 = percentiles(idle)
    busy_p50, busy_p99 = percentiles(busy) if busy else (float("nan"), float("nan"))
    return {
        "benchmark": "train_while_sampling",
        "results": [
            {
                "generation": f"8 x {generation_tokens} tokens in {generation_seconds:.1f} s",
                "tokens_generated": sum(len(s.tokens) for s in generated.sequences),
                "steps_idle": len(idle),
                "steps_while_sampling": len(busy),
                "idle_p50_ms": round(idle_p50, 1),
                "idle_p99_ms": round(idle_p99, 1),
                "sampling_p50_ms": round(busy_p50, 1),
                "sampling_p99_ms": round(busy_p99, 1),
                "p99_ratio": round(busy_p99 / idle_p99, 2),
            }
        ],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--generation-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    report = run(args.base_model, args.steps, args.generation_tokens)
    emit(report, list(report["results"][0]))
    return report


if __name__ == "__main__":
    main()
