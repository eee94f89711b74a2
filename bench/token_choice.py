"""Choosing the next token at real vocabulary sizes: the sampler's TokenChoice (temperature,
top-k / top-p, a seeded stream per row, one host read) against what Hugging Face `generate` does
(its top-p warper where asked, softmax, `torch.multinomial`), side by side on the same logits.

The sampling benchmark's embedded model has 259 tokens, where choosing costs nothing; Llama 3 has
128k and Qwen 2.5 152k, where it is a large part of a decode step on a CPU. Both run with the
worker's process settings (worker.main.prepare_process: its allocator setting), as the worker runs them.

Logits are normal with a spread per case: 3 gives a top-p 0.9 set of ~7700 of 152k tokens (a flat
distribution), 5 one of ~300 (peaked, as most of a language model's steps are). `nucleus` is the
largest such set of the case's rows. The sampler works top-p out over each row's most likely
tokens, as many as the last step's set needed, where `generate` sorts the whole vocabulary.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from bench.common import emit
from tinker_server import ops
from tinker_server.worker.main import prepare_process
from tinker_server.worker.sampling import TokenChoice


def per_call_ms(call: Callable[[], object], repeats: int) -> float:
    """The median of `repeats` timed calls, after one warm-up."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def nucleus(logits: torch.Tensor, top_p: float) -> int:
    """The most tokens a row's top-p set holds."""
    probs = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True).values
    return int(((probs.cumsum(dim=-1) - probs) < top_p).sum(dim=-1).max())


def measure(rows: int, vocab: int, top_p: float, spread: float, repeats: int, device: torch.device) -> dict:
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * spread).to(device)
    config = ops.SamplingConfig(16, 1.0, 0, top_p, 1, (), (), True)
    request = ops.Sample(None, None, np.zeros(1, dtype=np.int64), 1, config, False, 0)
    choice = TokenChoice([request] * rows, list(range(rows)))
    active = list(range(rows))

    def generate_step() -> list:
        scores = TopPLogitsWarper(top_p)(None, logits) if top_p < 1 else logits
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1)
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens).tolist()  # the logprobs a sampler reports

    ours = per_call_ms(lambda: choice.next(logits, active), repeats)
    theirs = per_call_ms(generate_step, repeats)
    return {
        "rows": rows,
        "vocab": vocab,
        "top_p": top_p,
        "spread": spread,
        "nucleus": nucleus(logits, top_p) if top_p < 1 else vocab,
        "token_choice_ms": round(ours, 2),
        "generate_ms": round(theirs, 2),
        "vs_generate": round(theirs / ours, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls of each; the median is reported")
    args, _ = parser.parse_known_args(argv)  # run_all passes every benchmark the same extra arguments
    device = prepare_process()  # the worker's device, and its process settings
    cases = [
        (32, 32_000, 1.0, 3.0),
        (32, 151_936, 1.0, 3.0),
        (128, 32_000, 1.0, 3.0),
        (32, 151_936, 0.9, 3.0),
        (32, 151_936, 0.9, 5.0),
        (128, 151_936, 0.9, 5.0),
    ]
    report = {
        "benchmark": "token_choice",
        "device": str(device),
        "results": [measure(*case, args.repeats, device) for case in cases],
    }
    emit(report, list(report["results"][0]))
    return report


if __name__ == "__main__":
    main()
