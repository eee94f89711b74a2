"""Shared pieces of the benchmarks: a server per run, batches, plain-torch training steps."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from server_process import running_server  # noqa: E402

from tinker_client import ServiceClient, types  # noqa: E402
from tinker_server.worker.models import load_base_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
ADAM = types.AdamParams(learning_rate=1e-4)


@contextmanager
def server(base_model: str | None, extra: list[str] | None = None) -> Iterator[ServiceClient]:
    with tempfile.TemporaryDirectory() as data_dir:
        args = (["--base-model", base_model] if base_model else []) + (extra or [])
        with running_server(Path(data_dir), args) as address:
            client = ServiceClient(base_url=address)
            try:
                yield client
            finally:
                client.close()


def batch(rows: int, length: int, seed: int, vocab: int = 256) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(rows):
        tokens = rng.integers(0, vocab, size=length + 1)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": np.ones(length, dtype=np.float32)},
            )
        )
    return data


def peft_trainer(base_model: str | None, rank: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The plain in-process baseline: the same base model with peft LoRA and torch AdamW."""
    model = get_peft_model(load_base_model(base_model).model, LoraConfig(r=rank, lora_alpha=32, target_modules=TARGETS))
    params = [param for param in model.parameters() if param.requires_grad]
    return model, torch.optim.AdamW(params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2), eps=ADAM.eps)


def torch_loss(model: torch.nn.Module, data: list[types.Datum]) -> torch.Tensor:
    """Weighted cross-entropy over one padded batch, the plain way: the batch's whole logits at once."""
    device = next(model.parameters()).device
    tokens = torch.tensor(np.stack([datum.model_input.to_ints() for datum in data]), device=device)
    targets = torch.tensor(
        np.stack([datum.loss_fn_inputs["target_tokens"].to_numpy() for datum in data]), device=device
    )
    weights = torch.tensor(np.stack([datum.loss_fn_inputs["weights"].to_numpy() for datum in data]), device=device)
    logits = model(input_ids=tokens).logits.float()
    logprobs = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return -(logprobs * weights).sum()


def torch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: list[types.Datum]) -> float:
    """One forward_backward (weighted cross-entropy over one padded batch) + AdamW step."""
    loss = torch_loss(model, data)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def seconds_per_call(step: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def emit(report: dict, columns: list[str]) -> None:
    """JSON on stdout; a readable table on stderr."""
    import json

    print(json.dumps(report), flush=True)
    rows = report["results"]
    widths = [max(len(column), *(len(str(row[column])) for row in rows)) for column in columns]
    print(f"\n{report['benchmark']}", file=sys.stderr)
    print("  ".join(column.rjust(width) for column, width in zip(columns, widths, strict=True)), file=sys.stderr)
    for row in rows:
        print(
            "  ".join(str(row[column]).rjust(width) for column, width in zip(columns, widths, strict=True)),
            file=sys.stderr,
        )
