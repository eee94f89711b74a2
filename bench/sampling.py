"""Batched sampling through the service vs a naive loop of `transformers` generate.

For 1, 8 and 32 concurrent requests: generated tokens per second through a real server
(requests decoded together, KV cache), set beside the same number of sequential
`model.generate` calls on the same model in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from server_process import running_server  # noqa: E402

from tinker_client import ServiceClient, types  # noqa: E402
from tinker_server.worker.models import load_base_model  # noqa: E402


def prompts(count: int, length: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (length,), generator=generator).tolist() for _ in range(count)]


def service_tokens_per_second(sampler, batch: list[list[int]], max_tokens: int) -> float:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0, stop=[])
    start = time.perf_counter()
    futures = [sampler.sample(types.ModelInput.from_ints(prompt), 1, params) for prompt in batch]
    generated = sum(len(future.result().sequences[0].tokens) for future in futures)
    return generated / (time.perf_counter() - start)


def generate_loop_tokens_per_second(model, batch: list[list[int]], max_tokens: int) -> float:
    start = time.perf_counter()
    generated = 0
    with torch.no_grad():
        for prompt in batch:
            output = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=True,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                pad_token_id=model.config.pad_token_id,
            )
            generated += output.shape[1] - len(prompt)
    return generated / (time.perf_counter() - start)


def run(concurrency: list[int], max_tokens: int, prompt_length: int, base_model: str | None) -> dict:
    model = load_base_model(base_model).model
    results = []
    with tempfile.TemporaryDirectory() as data_dir:
        extra = ["--base-model", base_model] if base_model else []
        with running_server(Path(data_dir), extra) as address:
            service = ServiceClient(base_url=address)
            sampler = service.create_sampling_client(
                base_model=service.get_server_capabilities().supported_models[0].model_name
            ).result()
            service_tokens_per_second(sampler, prompts(2, prompt_length), 4)  # warm-up
            for count in concurrency:
                batch = prompts(count, prompt_length)
                served = service_tokens_per_second(sampler, batch, max_tokens)
                naive = generate_loop_tokens_per_second(model, batch, max_tokens)
                results.append(
                    {
                        "concurrent_requests": count,
                        "service_tokens_per_s": round(served, 1),
                        "generate_loop_tokens_per_s": round(naive, 1),
                        "speedup": round(served / naive, 2),
                    }
                )
            service.close()
    return {"benchmark": "sampling", "max_tokens": max_tokens, "prompt_length": prompt_length, "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated request counts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--base-model", default=None, help="local HF directory (default: embedded model)")
    args = parser.parse_args(argv)
    report = run([int(n) for n in args.concurrency.split(",")], args.max_tokens, args.prompt_length, args.base_model)
    print(json.dumps(report))
    print(f"{'requests':>9} {'service tok/s':>14} {'generate tok/s':>15} {'speedup':>8}", file=sys.stderr)
    for row in report["results"]:
        print(
            f"{row['concurrent_requests']:>9} {row['service_tokens_per_s']:>14} "
            f"{row['generate_loop_tokens_per_s']:>15} {row['speedup']:>8}",
            file=sys.stderr,
        )
    return report


if __name__ == "__main__":
    main()
