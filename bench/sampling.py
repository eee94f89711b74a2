"""Batched sampling through the service, side by side in one run with one static Hugging Face
`generate` batch of the same requests and with the same requests sent one at a time.

Three workloads at each concurrency (default 32 and 128 requests):
- uniform: one prompt length, one output length, one sample per request, the bare base model;
- mixed: prompt lengths 4-64, output lengths 8-MAX, num_samples of 1, 4 or 8, and three weights
  (the base model and two LoRA adapters) mixed in one batch;
- shared_prefix: as mixed, every prompt a common 192-token prefix (a system prompt, few-shot
  examples) and 8-32 tokens of its own: the service computes the prefix once per weights.

Throughput counts the tokens each request asked for. End-of-sequence ends no sequence anywhere
(`stop=[]` through the service, `ignore_eos` in the engine, `min_new_tokens` in `generate`), so
every method produces max_tokens per sample and does the same work. The static batch decodes every
row to the longest output of the batch (what a static batch costs), each row on its own weights: the
base model, or one of two LoRA adapters of the same rank in one batch (peft's mixed-adapter batch,
`adapter_names`); `vs_static_base_model` compares with the same batch on the bare base model, which
does no LoRA work at all. The worker's engine alone (no server: every request in one cycle, on the
same weights) shows what the service's own path costs on top. The static batch and the engine run
where the server's worker does (a GPU if there is one), in its dtype, with its process settings
(its attention kernels among them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from bench.common import TARGETS, emit, running_server
from tinker_client import ServiceClient, types
from tinker_server import ops
from tinker_server.worker.engine import Engine
from tinker_server.worker.main import prepare_process
from tinker_server.worker.models import load_base_model, resolve_dtype

SHARED_PREFIX = 192
ADAPTER_RANK = 8
ADAPTERS = ("adapter-1", "adapter-2")
"""What a request's `weights` 1 and 2 read (0: the base model)."""
BASE_MODEL = (None, None, None)


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    num_samples: int
    max_tokens: int
    weights: int
    """0: the base model; 1, 2: an adapter."""


def workload(kind: str, count: int, max_tokens: int, seed: int = 0, tokens_seed: int = 0) -> list[Request]:
    """`tokens_seed` draws the prompts' tokens alone: the same lengths, samples and weights with
    other prompts, so that a run finds nothing of an earlier run's in the server's prefix cache
    (the static batch has none to find)."""
    shapes, tokens = np.random.default_rng(seed), np.random.default_rng([seed, tokens_seed])
    if kind == "uniform":
        return [Request(tokens.integers(0, 256, 16).tolist(), 1, max_tokens, 0) for _ in range(count)]
    prefix = tokens.integers(0, 256, SHARED_PREFIX).tolist() if kind == "shared_prefix" else []
    own = (8, 33) if prefix else (4, 65)
    return [
        Request(
            prefix + tokens.integers(0, 256, int(shapes.integers(*own))).tolist(),
            int(shapes.choice([1, 4, 8])),
            int(shapes.integers(8, max_tokens + 1)),
            int(shapes.integers(0, 3)),
        )
        for _ in range(count)
    ]


def useful(tokens: list[int], max_tokens: int) -> int:
    """Tokens of a sequence that its request asked for (a static batch decodes on past them)."""
    return min(len(tokens), max_tokens)


def served(samplers: list, requests: list[Request], one_at_a_time: bool) -> float:
    """Useful tokens per second through the server: every request at once, or one after another."""

    def send(request: Request):
        params = types.SamplingParams(max_tokens=request.max_tokens, temperature=1.0, stop=[])
        return samplers[request.weights].sample(types.ModelInput.from_ints(request.prompt), request.num_samples, params)

    start = time.perf_counter()
    if one_at_a_time:
        results = [send(request).result() for request in requests]
    else:
        results = [future.result() for future in [send(request) for request in requests]]
    elapsed = time.perf_counter() - start
    return (
        sum(
            useful(list(sequence.tokens), request.max_tokens)
            for request, result in zip(requests, results, strict=True)
            for sequence in result.sequences
        )
        / elapsed
    )


def static_batch(model: torch.nn.Module, requests: list[Request]) -> float:
    """Useful tokens per second of one left-padded `generate` batch of every row: on its weights
    where `model` is a PeftModel with ADAPTERS, on the base model otherwise."""
    rows = [(request.prompt, request.max_tokens) for request in requests for _ in range(request.num_samples)]
    options = {}
    if isinstance(model, PeftModel):
        names = ("__base__", *ADAPTERS)
        options["adapter_names"] = [names[request.weights] for request in requests for _ in range(request.num_samples)]
    width = max(len(prompt) for prompt, _ in rows)
    input_ids = torch.full((len(rows), width), model.config.pad_token_id)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (prompt, _) in enumerate(rows):
        input_ids[index, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[index, width - len(prompt) :] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    longest = max(max_tokens for _, max_tokens in rows)
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,  # the whole distribution, as the service samples it (generate's default is 50)
            top_p=1.0,
            max_new_tokens=longest,
            min_new_tokens=longest,
            pad_token_id=model.config.pad_token_id,
            **options,
        )
    generated = output[:, width:].tolist()  # waits for the device
    elapsed = time.perf_counter() - start
    return sum(useful(tokens, max_tokens) for tokens, (_, max_tokens) in zip(generated, rows, strict=True)) / elapsed


def in_process(engine: Engine, requests: list[Request], weights: tuple[str | None, ...] = BASE_MODEL) -> float:
    """Useful tokens per second of the engine alone: every request in one cycle, decoded to its end.
    `weights` names what each request's `weights` index reads: the base model (None) or a sampler
    snapshot of the engine (see `add_adapters`)."""
    items = [
        ops.WorkItem(
            f"bench-{index}",
            "",
            ops.Sample(
                weights[request.weights],
                None,
                np.asarray(request.prompt, dtype=np.int64),
                request.num_samples,
                ops.SamplingConfig(request.max_tokens, 1.0, 0, 1.0, None, (), (), True),
                False,
                0,
            ),
        )
        for index, request in enumerate(requests)
    ]
    start = time.perf_counter()
    outcomes = engine.run_cycle(ops.Cycle(1, items))
    elapsed = time.perf_counter() - start
    return (
        sum(
            useful(sequence.tokens.tolist(), request.max_tokens)
            for request, outcome in zip(requests, outcomes, strict=True)
            for sequence in outcome.result.sequences
        )
        / elapsed
    )


def add_adapters(engine: Engine, directory: Path) -> tuple[str | None, ...]:
    """ADAPTERS, seeded on every weight of the engine's model and saved as sampler snapshots in
    `directory` (weights that never change, whose prompts are kept for reuse, as the service's
    samplers are); what each request's `weights` index reads in `in_process`."""
    spec = ops.LoraSpec(rank=ADAPTER_RANK, seed=0, train_mlp=True, train_attn=True, train_unembed=True, alpha=32.0)
    snapshots = [f"tinker://{name}/sampler_weights/bench" for name in ADAPTERS]
    items = [ops.WorkItem(f"create-{name}", name, ops.CreateAdapter(spec)) for name in ADAPTERS] + [
        ops.WorkItem(f"save-{name}", name, ops.SaveForSampler(snapshot, str(directory / name)))
        for name, snapshot in zip(ADAPTERS, snapshots, strict=True)
    ]
    for outcome in engine.run_cycle(ops.Cycle(0, items)):
        assert outcome.error is None, outcome.error
    return (None, *snapshots)


def with_peft_adapters(model: torch.nn.Module) -> PeftModel:
    """`model` with ADAPTERS on the weights the service's adapters cover, for `generate`."""
    config = LoraConfig(r=ADAPTER_RANK, lora_alpha=32, target_modules=TARGETS)
    peft_model = get_peft_model(model, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        peft_model.add_adapter(name, config)
    return peft_model.eval()


def samplers_for(service: ServiceClient) -> list:
    """The base model's sampler and two adapters' (trained one step, so they differ from it)."""
    base_model = service.get_server_capabilities().supported_models[0].model_name
    samplers = [service.create_sampling_client(base_model=base_model).result()]
    for seed in (1, 2):
        training = service.create_lora_training_client(base_model, rank=ADAPTER_RANK, seed=seed).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(list(range(10, 40))),
            loss_fn_inputs={"target_tokens": list(range(11, 41)), "weights": [1.0] * 30},
        )
        training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        samplers.append(training.save_weights_and_get_sampling_client(f"bench-{seed}").result())
    return samplers


WORKLOADS = ("uniform", "mixed", "shared_prefix")


def run(
    concurrency: list[int],
    max_tokens: int,
    base_model: str | None,
    repeats: int = 3,
    one_at_a_time: bool = True,
    workloads: tuple[str, ...] = WORKLOADS,
) -> dict:
    """Each rate is the median of `repeats` runs, the methods taking turns (a noisy machine moves
    every one of them alike); `vs_static_batch_range` spans the ratios of single runs (how far one
    run's ratio can stray on this machine)."""
    device = prepare_process()  # the worker's device, and its process settings
    dtype = resolve_dtype("auto", device)
    model = load_base_model(base_model, dtype).model.to(device)
    adapted_model = with_peft_adapters(load_base_model(base_model, dtype).model.to(device))
    engine = Engine(load_base_model(base_model, dtype), device)  # its own copy: it wraps the layers
    results = []
    with tempfile.TemporaryDirectory() as data_dir:
        weights = add_adapters(engine, Path(data_dir) / "engine-adapters")
        in_process(engine, workload("mixed", 4, 8), weights)  # warm-up
        extra = ["--base-model", base_model] if base_model else []
        with running_server(Path(data_dir), extra) as address:
            service = ServiceClient(base_url=address)
            samplers = samplers_for(service)
            served(samplers, workload("mixed", 4, 8), one_at_a_time=False)  # warm-up
            for kind in workloads:
                for count in concurrency:
                    rates = []
                    for repeat in range(repeats):  # fresh prompts each time: no run reuses another's
                        requests = workload(kind, count, max_tokens, tokens_seed=repeat)
                        base_rate = static_batch(model, requests)
                        adapted = any(request.weights for request in requests)
                        rates.append(
                            (
                                served(samplers, requests, one_at_a_time=False),
                                static_batch(adapted_model, requests) if adapted else base_rate,
                                base_rate,
                                in_process(engine, requests, weights),
                            )
                        )
                    service_rate, static_rate, base_rate, engine_rate = np.median(rates, axis=0).tolist()
                    ratios = [service / static for service, static, _, _ in rates]
                    row = {
                        "workload": kind,
                        "requests": count,
                        "rows": sum(request.num_samples for request in requests),
                        "service_tokens_per_s": round(service_rate, 1),
                        "static_batch_tokens_per_s": round(static_rate, 1),
                        "vs_static_batch": round(service_rate / static_rate, 2),
                        "vs_static_batch_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                        "vs_static_base_model": round(service_rate / base_rate, 2),
                        "engine_vs_static_batch": round(engine_rate / static_rate, 2),
                    }
                    if one_at_a_time:
                        fresh = workload(kind, count, max_tokens, tokens_seed=repeats)
                        row["vs_one_at_a_time"] = round(service_rate / served(samplers, fresh, True), 2)
                    results.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)  # a run cut short still shows these
            service.close()
    return {"benchmark": "sampling", "device": str(device), "max_tokens": max_tokens, "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", default="32,128", help="comma-separated request counts")
    parser.add_argument("--max-tokens", type=int, default=64, help="the output length (uniform), the longest (mixed)")
    parser.add_argument("--base-model", default=None, help="local HF directory (default: embedded model)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method; the median is reported")
    parser.add_argument(
        "--skip-one-at-a-time", action="store_true", help="leave out the requests sent one after another (slow)"
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)} (default: all)"
    )
    args = parser.parse_args(argv)
    concurrency = [int(n) for n in args.concurrency.split(",")]
    workloads = tuple(args.workloads.split(","))
    if unknown := set(workloads) - set(WORKLOADS):
        parser.error(f"--workloads: unknown {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    report = run(concurrency, args.max_tokens, args.base_model, args.repeats, not args.skip_one_at_a_time, workloads)
    emit(report, [key for key in report["results"][0]])
    return report


if __name__ == "__main__":
    main()
