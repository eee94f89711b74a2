"""Attention at shapes not seen before: PyTorch's own choice of kernels against the worker's
(cuDNN's attention left out, tinker_server.worker.attention_kernels), side by side on the same
shapes, call after call.

Two cases, as the worker meets them:
- decode: every row one new query over a key/value length one longer at each step, read from a
  preallocated cache, under a padding mask (rows start at different columns);
- training: forward and backward over a batch padded to a new length each step, causal and padded.

Each case runs its steps twice: milliseconds per call the first time each shape is met ("new")
and the second time ("seen"). A kernel that builds a plan per shape (cuDNN on Hopper and
Blackwell GPUs) pays on "new" only; `kernel` names the one PyTorch picked. On a CPU both choices
are the same kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from bench.common import emit
from tinker_server.worker.attention_kernels import avoid_per_shape_plans
from tinker_server.worker.models import resolve_dtype


@contextmanager
def kernels(choice: str, device: torch.device) -> Iterator[None]:
    """'default': PyTorch's own order; 'worker': as the worker sets its process."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    if choice == "worker":
        avoid_per_shape_plans(device)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def timed_ms(call: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def padding_mask(rows: int, length: int, queries: int, device: torch.device) -> torch.Tensor:
    """[rows, 1, queries, length] booleans: row r starts r % 8 columns in, and (queries > 1) is causal."""
    columns = torch.arange(length, device=device)
    starts = (torch.arange(rows, device=device) % 8)[:, None, None, None]
    keys = columns[None, None, None, :]
    query_columns = (length - queries + torch.arange(queries, device=device))[None, None, :, None]
    return (keys >= starts) & (keys <= query_columns)


def decode_calls(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Callable[[], object]]:
    capacity = args.start_length + args.steps
    shape = (args.rows, args.heads, capacity, args.head_dim)
    keys, values = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    query = torch.randn(args.rows, args.heads, 1, args.head_dim, device=device, dtype=dtype)

    def step(length: int) -> Callable[[], object]:
        mask = padding_mask(args.rows, length, 1, device)
        return lambda: F.scaled_dot_product_attention(query, keys[:, :, :length], values[:, :, :length], attn_mask=mask)

    return [step(args.start_length + index) for index in range(args.steps)]


def training_calls(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Callable[[], object]]:
    rows = max(1, args.rows // 16)  # a training batch: fewer rows, every position a query

    def step(length: int) -> Callable[[], object]:
        shape = (rows, args.heads, length, args.head_dim)
        inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        mask = padding_mask(rows, length, length, device)

        def forward_backward() -> None:
            for tensor in inputs:
                tensor.grad = None  # each call allocates its gradients, as a training step does
            F.scaled_dot_product_attention(*inputs, attn_mask=mask).sum().backward()

        return forward_backward

    return [step(args.start_length + 7 * index) for index in range(args.steps)]


def kernel_of(call: Callable[[], object]) -> str:
    """The attention kernel PyTorch picked for the call: the aten operator its dispatch ran (its
    name says the backend: cudnn, flash, efficient, or math)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        call()
    names = {event.name for event in profile.events() if event.name.startswith("aten::_scaled_dot_product")}
    backward = {name for name in names if "backward" in name}
    return ", ".join(sorted(names - backward)) or "math (no fused kernel)"


def measure(case: str, choice: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    calls = (decode_calls if case == "decode" else training_calls)(args, device, dtype)
    with kernels(choice, device):
        new = [timed_ms(call, device) for call in calls]
        seen = [timed_ms(call, device) for call in calls]
        kernel = kernel_of(calls[-1])
    return {
        "case": case,
        "kernels": choice,
        "kernel": kernel,
        "new_shape_ms": round(statistics.median(new), 3),
        "seen_shape_ms": round(statistics.median(seen), 3),
        "new_vs_seen": round(statistics.median(new) / statistics.median(seen), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64, help="decode rows (training: a sixteenth of them)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--start-length", type=int, default=128, help="the first key/value length")
    parser.add_argument("--steps", type=int, default=24, help="shapes per case, each new")
    args, _ = parser.parse_known_args(argv)  # run_all passes every benchmark the same extra arguments
    # The worker's device, but not its process settings (prepare_process): both choices are measured.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    warm_up = argparse.Namespace(**{**vars(args), "start_length": 8, "steps": 1})
    for case in ("decode", "training"):  # loads each kernel's code, at shapes measured nowhere
        for choice in ("worker", "default"):
            measure(case, choice, warm_up, device, dtype)
    # Each case measures the worker's choice first: PyTorch's own then meets every shape fresh too,
    # as the worker's kernels keep nothing per shape for it to find.
    results = [
        measure(case, choice, args, device, dtype)
        for case in ("decode", "training")
        for choice in ("worker", "default")
    ]
    report = {"benchmark": "attention_shapes", "device": str(device), "dtype": str(dtype), "results": results}
    emit(report, list(results[0]))
    return report


if __name__ == "__main__":
    main()
