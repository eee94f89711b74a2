"""Peak memory of one forward_backward: the worker's engine against a plain HF + peft loop.

A seeded Llama-style model with a 32k vocabulary (--base-model PATH for a real one), a rank-16
LoRA on every projection and on the output embedding, and one forward_backward (weighted
cross-entropy) of 1x4096 and of 8x1024 tokens. Each peak is measured in a subprocess of its own,
so that it is that pass's: on a GPU torch.cuda.max_memory_allocated, on a CPU the process's peak
RSS (VmHWM); both less what the process held before the pass (model, adapter, batch).
Tokens per second: both systems in this process, their passes interleaved, the best of each
after a warm-up pass.
Goal: the engine's peak at most half the plain loop's, at tokens/s within 10% of it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from bench.common import TARGETS, batch, emit, torch_loss
from tinker_client import types
from tinker_server import ops
from tinker_server.worker.engine import Engine
from tinker_server.worker.models import DTYPES, LoadedModel, byte_tokenizer, load_base_model, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
Step = Callable[[], None]


def build_model(spec: dict, dtype: torch.dtype) -> PreTrainedModel:
    """The base model: a local directory, or a seeded Llama of the spec's size (built in float32, then cast)."""
    if spec["base_model"]:
        return load_base_model(spec["base_model"], dtype).model
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["hidden"] * 8 // 3,
        num_hidden_layers=spec["layers"],
        num_attention_heads=max(1, spec["hidden"] // 64),
        num_key_value_heads=max(1, spec["hidden"] // 128),
        max_position_embeddings=max(length for _, length in spec["shapes"]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).to(dtype).eval()


def engine_step(model: PreTrainedModel, data: list[types.Datum], rank: int, device: torch.device) -> Step:
    """forward_backward through the worker's engine, as the server runs it (default options)."""
    loaded = LoadedModel("bench", model, byte_tokenizer(), model.config.max_position_embeddings, ())
    engine = Engine(loaded, device)
    run_operation(engine, ops.CreateAdapter(ops.LoraSpec(rank, SEED, True, True, True, 32.0)))
    arrays = [
        ops.DatumArrays(
            datum.model_input.to_numpy(), {key: value.to_numpy() for key, value in datum.loss_fn_inputs.items()}
        )
        for datum in data
    ]
    operation = ops.ForwardBackward(arrays, "cross_entropy", {}, backward=True)
    return lambda: run_operation(engine, operation)


def run_operation(engine: Engine, operation: ops.Operation) -> None:
    (outcome,) = engine.run_cycle(ops.Cycle(0, [ops.WorkItem("bench", "bench", operation)]))
    if outcome.error is not None:
        raise RuntimeError(outcome.error.message)


def peft_step(model: PreTrainedModel, data: list[types.Datum], rank: int, device: torch.device) -> Step:
    """The plain loop: peft LoRA on the same layers, the batch's whole logits, backward."""
    lora = get_peft_model(model.to(device), LoraConfig(r=rank, lora_alpha=32, target_modules=TARGETS))
    return lambda: torch_loss(lora, data).backward()


SYSTEMS: dict[str, Callable[[PreTrainedModel, list[types.Datum], int, torch.device], Step]] = {
    "engine": engine_step,
    "peft": peft_step,
}


def memory_in_use(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return process_status_bytes("VmRSS")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # Not getrusage's ru_maxrss: Linux carries the parent's peak over fork and exec into it, so a
    # child of a process that had run a big pass reported that pass's peak as its own.
    return process_status_bytes("VmHWM")


def process_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (Linux): VmRSS is the resident memory now, VmHWM its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(field)


def prepared(system: str, rows: int, length: int, spec: dict) -> tuple[Step, torch.device]:
    """One system's forward_backward on its own copy of the model, ready to run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(spec, resolve_dtype(spec["dtype"], device))
    data = batch(rows, length, seed=SEED, vocab=model.config.vocab_size)
    return SYSTEMS[system](model, data, spec["rank"], device), device


def timed(step: Step, device: torch.device) -> float:
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_memory(system: str, rows: int, length: int, spec: dict) -> dict:
    """In a child process of its own: one pass's peak above what the process held before it."""
    step, device = prepared(system, rows, length, spec)
    held = memory_in_use(device)
    step()
    return {"peak_mb": (peak_memory(device) - held) / 2**20, "held_mb": held / 2**20}


def measure_speed(rows: int, length: int, spec: dict) -> dict:
    """Tokens/s of both systems, their passes interleaved so that both see the same machine noise
    (a shared machine may be busy with other work); each one's best time after a warm-up pass."""
    steps = {system: prepared(system, rows, length, spec) for system in SYSTEMS}
    seconds: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    for _ in range(1 + spec["repeats"]):
        for system, (step, device) in steps.items():
            seconds[system].append(timed(step, device))
    return {system: rows * length / min(times[1:] or times) for system, times in seconds.items()}


def memory_in_subprocess(system: str, rows: int, length: int, spec: dict) -> dict:
    """measure_memory in a fresh Python process."""
    command = [sys.executable, "-m", "bench.memory", "--child", json.dumps([system, rows, length, spec])]
    # glibc otherwise keeps freed blocks mapped in per-thread arenas: the engine's peak RSS at 8x1024
    # varied from 0.84 to 1.19 GB between runs. Each block of 128 KiB or more mapped on its own
    # (and unmapped when freed), RSS follows the live tensors: the same peak every run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{system} {rows}x{length} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def run(
    shapes: list[tuple[int, int]],
    hidden: int = 256,
    layers: int = 4,
    vocab: int = 32000,
    rank: int = 16,
    repeats: int = 2,
    dtype: str = "auto",
    base_model: str | None = None,
) -> dict:
    spec = {"shapes": shapes, "hidden": hidden, "layers": layers, "vocab": vocab, "rank": rank}
    spec |= {"repeats": repeats, "dtype": dtype, "base_model": base_model}
    results = []
    for rows, length in shapes:
        engine, peft = (memory_in_subprocess(system, rows, length, spec) for system in SYSTEMS)
        speed = measure_speed(rows, length, spec)
        results.append(
            {
                "batch": f"{rows}x{length}",
                "engine_peak_mb": round(engine["peak_mb"], 1),
                "peft_peak_mb": round(peft["peak_mb"], 1),
                "memory_ratio": round(engine["peak_mb"] / peft["peak_mb"], 3),
                "engine_tokens_per_s": round(speed["engine"], 1),
                "peft_tokens_per_s": round(speed["peft"], 1),
                "speed_ratio": round(speed["engine"] / speed["peft"], 3),
                "held_mb": round(engine["held_mb"], 1),
                "target": "memory <= 0.5, speed >= 0.9",
            }
        )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    model = base_model or f"seeded Llama, hidden {hidden}, {layers} layers, vocab {vocab}"
    return {"benchmark": "memory", "device": device, "model": model, "rank": rank, "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="local HF directory (default: a seeded 32k-vocab Llama)")
    parser.add_argument("--shapes", default="1x4096,8x1024", help="rows x tokens per batch, comma-separated")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the first")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:  # one measurement, in its own process
        print(json.dumps(measure_memory(*json.loads(args.child))), flush=True)
        return {}
    shapes = [tuple(int(size) for size in shape.split("x")) for shape in args.shapes.split(",")]
    report = run(shapes, args.hidden, args.layers, args.vocab, args.rank, args.repeats, args.dtype, args.base_model)
    emit(report, list(report["results"][0]))
    return report


if __name__ == "__main__":
    main()
