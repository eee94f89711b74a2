"""The worker's engine with its RMS norms on PyTorch's fused kernel (as it runs) vs with Hugging
Face's own (tinker_server/worker/fused_norms.py), side by side in one process: the same uniform
requests decoded by each in turn, run after run, on the worker's device and in its dtype.

A decode step of a small batch on a GPU is bound by the kernels the host launches; Llama's norm
launches eight where the fused one launches one. On a CPU the operations themselves cost most of a
step, and the two should be about even.
"""

from __future__ import annotations

import argparse
from unittest import mock

import numpy as np

from bench.common import emit
from bench.sampling import in_process, workload
from tinker_server.worker.engine import Engine
from tinker_server.worker.main import prepare_process
from tinker_server.worker.models import load_base_model, resolve_dtype


def run(base_model: str | None, rows: list[int], max_tokens: int, runs: int) -> dict:
    device = prepare_process()
    dtype = resolve_dtype("auto", device)
    fused = Engine(load_base_model(base_model, dtype), device)
    with mock.patch("tinker_server.worker.engine.fuse_rms_norms"):  # Hugging Face's norms, as loaded
        unfused = Engine(load_base_model(base_model, dtype), device)
    for engine in (fused, unfused):  # warm-up
        in_process(engine, workload("uniform", 2, 4))
    results = []
    for count in rows:
        rates = []
        for repeat in range(runs):  # fresh prompts each time: neither finds the other's in its prefix cache
            requests = workload("uniform", count, max_tokens, tokens_seed=repeat)
            rates.append((in_process(fused, requests), in_process(unfused, requests)))
        ratios = [fused_rate / unfused_rate for fused_rate, unfused_rate in rates]
        fused_rate, unfused_rate = np.median(rates, axis=0).tolist()
        results.append(
            {
                "rows": count,
                "fused_tokens_per_s": round(fused_rate, 1),
                "hf_norms_tokens_per_s": round(unfused_rate, 1),
                "speedup": round(float(np.median(ratios)), 2),
                "speedup_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
            }
        )
    return {"benchmark": "fused_norms", "device": str(device), "max_tokens": max_tokens, "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-model", default=None, help="local HF directory (default: embedded model)")
    parser.add_argument("--rows", default="32,128", help="comma-separated request counts (one row each)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=6, help="runs of each engine, taking turns")
    args = parser.parse_args(argv)
    report = run(args.base_model, [int(n) for n in args.rows.split(",")], args.max_tokens, args.runs)
    emit(report, list(report["results"][0]))
    return report


if __name__ == "__main__":
    main()
