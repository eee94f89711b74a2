"""Milliseconds per decode step, run after run: the worker's engine and one static Hugging Face
`generate` batch on the same requests, each run in turn several times, on the worker's device.

The first run of a set of shapes (rows, key/value lengths) paid for them on an H200 (40-90 ms a
step more, for both methods), before the worker left cuDNN's attention out (its settings are this
process's: see tinker_server/worker/attention_kernels.py); later runs show what a step costs warm.
Cases pull the workloads apart: ragged outputs (rows leave the engine's batch, new shapes),
ragged prompts (padding, masks), several samples per prompt, and the sampling benchmark's mixed
workload, on the base model and (mixed_adapters, for the engine) with two thirds of its rows on two
LoRA adapters, as the service runs it (`generate` runs the base model: what LoRA costs a step).
With `--rows-stay`, a last pass keeps finished rows in the engine's batch (one batch shape all along).
On a GPU, `engine_waits_per_step` counts the times a decode step of the engine made the host wait
for the device (PyTorch's sync debug mode reports each), on average: the tokens chosen are read
once a step; masks of padded rows (Hugging Face's) add one more, and rows joining or leaving one
each time they do; anything else is a stall to remove.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.common import emit
from bench.sampling import BASE_MODEL, Request, add_adapters, in_process, static_batch, workload
from tinker_server.worker import sampling
from tinker_server.worker.engine import Engine
from tinker_server.worker.main import prepare_process
from tinker_server.worker.models import load_base_model, resolve_dtype


def cases(tokens_seed: int) -> dict[str, list[Request]]:
    """The same lengths and samples for every `tokens_seed`, other prompts: a run finds nothing of
    an earlier one's in the engine's prefix cache."""
    shapes, tokens = np.random.default_rng(0), np.random.default_rng([0, tokens_seed])

    def requests(count: int, prompt: Callable[[], int], samples: int, output: Callable[[], int]) -> list[Request]:
        return [Request(tokens.integers(0, 256, prompt()).tolist(), samples, output(), 0) for _ in range(count)]

    return {
        "uniform": requests(32, lambda: 16, 1, lambda: 64),
        "ragged_outputs": requests(32, lambda: 16, 1, lambda: int(shapes.integers(8, 65))),
        "ragged_prompts": requests(32, lambda: int(shapes.integers(4, 65)), 1, lambda: 64),
        "samples_4": requests(8, lambda: 16, 4, lambda: 64),
        "mixed": workload("mixed", 32, 64, tokens_seed=tokens_seed),
        "mixed_adapters": workload("mixed", 32, 64, tokens_seed=tokens_seed),
    }


ADAPTED = {"mixed_adapters"}
"""The cases whose requests read the weights they name (the others: the base model)."""


def step_ms(run: Callable[[list[Request]], object], requests: list[Request], device: torch.device) -> float:
    """One run's milliseconds per step of its longest output."""
    start = time.perf_counter()
    run(requests)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round((time.perf_counter() - start) * 1000 / max(request.max_tokens for request in requests), 2)


def waits_per_step(run: Callable[[list[Request]], object], requests: list[Request]) -> float:
    """How many times a decode step of one run made the host wait for the GPU, on average (the
    prefill's reads left out: PyTorch's sync debug mode is on during steps only)."""
    step, steps = sampling.Generation.step, 0

    def watched(generation: sampling.Generation) -> None:
        nonlocal steps
        steps += 1
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(generation)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampling.Generation.step = watched
        try:
            run(requests)
        finally:
            sampling.Generation.step = step
    waits = [warning for warning in caught if "synchronizing" in str(warning.message)]  # (not other warnings)
    return round(len(waits) / max(steps, 1), 2)


def step_times(engine: Engine, model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> list[dict]:
    """Every case, each method `args.runs` times in turn; with `args.rows_stay`, a second pass."""
    with tempfile.TemporaryDirectory() as directory:
        adapted = add_adapters(engine, Path(directory))
        static_run = functools.partial(static_batch, model)
        results = []
        leave_fraction = sampling.LEAVE_FRACTION
        passes = [("leave", leave_fraction)] + ([("stay", float("inf"))] if args.rows_stay else [])
        for index, (rows_finished, fraction) in enumerate(passes):
            sampling.LEAVE_FRACTION = fraction
            runs = [cases(index * args.runs + run) for run in range(args.runs)]
            for name in runs[0]:
                engine_run = functools.partial(in_process, engine, weights=adapted if name in ADAPTED else BASE_MODEL)
                times = [
                    (step_ms(engine_run, run[name], device), step_ms(static_run, run[name], device)) for run in runs
                ]
                result = {
                    "case": name,
                    "finished_rows": rows_finished,
                    "rows": sum(request.num_samples for request in runs[0][name]),
                    "engine_ms_per_step": [engine_ms for engine_ms, _ in times],
                    "static_ms_per_step": [static_ms for _, static_ms in times],
                }
                if device.type == "cuda":
                    result["engine_waits_per_step"] = waits_per_step(engine_run, runs[-1][name])
                results.append(result)
        sampling.LEAVE_FRACTION = leave_fraction
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=None, help="local HF directory (default: embedded model)")
    parser.add_argument("--runs", type=int, default=4, help="runs of each method per case, in turn")
    parser.add_argument("--rows-stay", action="store_true", help="then again with finished rows kept in the batch")
    args = parser.parse_args(argv)
    device = prepare_process()  # the worker's device, and its process settings
    dtype = resolve_dtype("auto", device)
    engine = Engine(load_base_model(args.base_model, dtype), device)
    model = load_base_model(args.base_model, dtype).model.to(device)
    results = step_times(engine, model, device, args)
    report = {"benchmark": "decode_steps", "device": str(device), "results": results}
    emit(report, list(results[0]))
    return report


if __name__ == "__main__":
    main()
