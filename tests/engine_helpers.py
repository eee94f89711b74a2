"""The worker's engine in process, for tests that check its passes against plain torch."""

from __future__ import annotations

import numpy as np
import torch

from tinker_server import ops
from tinker_server.worker.engine import Engine
from tinker_server.worker.models import load_base_model

VOCAB = 259


def lora_spec(seed: int) -> ops.LoraSpec:
    return ops.LoraSpec(rank=4, seed=seed, train_mlp=True, train_attn=True, train_unembed=True, alpha=32.0)


def engine_with_adapters(
    names: tuple[str, ...] = ("a", "b"), dtype: torch.dtype = torch.float32, **options: int
) -> Engine:
    """The embedded model with adapters whose B is random too, so every adapter changes the logits."""
    engine = Engine(load_base_model(None, dtype), torch.device("cpu"), **options)
    for seed, name in enumerate(names):
        (created,) = engine.run_cycle(ops.Cycle(0, [ops.WorkItem("c", name, ops.CreateAdapter(lora_spec(seed)))]))
        assert created.error is None, created.error
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pair in engine.residency.run(name).pairs.values():
                pair.B.copy_(0.05 * torch.randn(pair.B.shape, generator=generator))
    return engine


def datum(rng: np.random.Generator, length: int, top_k: int = 0) -> ops.DatumArrays:
    """Random next-token data with random weights; top_k > 0 gives [N, K] targets and weights."""
    shape = (length, top_k) if top_k else (length,)
    return ops.DatumArrays(
        rng.integers(0, VOCAB, length).astype(np.int64),
        {
            "target_tokens": rng.integers(0, VOCAB, shape).astype(np.int64),
            "weights": rng.uniform(0.0, 1.0, shape).astype(np.float32),
        },
    )


def batches(seed: int = 0) -> dict[str, list[ops.DatumArrays]]:
    """Ragged rows for two adapters, one of them with top-K targets."""
    rng = np.random.default_rng(seed)
    return {
        "a": [datum(rng, 30), datum(rng, 17), datum(rng, 26)],
        "b": [datum(rng, 22, top_k=3), datum(rng, 9)],
    }


def forward_items(data: dict[str, list[ops.DatumArrays]], backward: bool = True) -> list[ops.WorkItem]:
    """A cross-entropy item per adapter."""
    return [
        ops.WorkItem(name, name, ops.ForwardBackward(rows, "cross_entropy", {}, backward))
        for name, rows in data.items()
    ]


def forward_backward(
    engine: Engine, data: dict[str, list[ops.DatumArrays]], backward: bool = True
) -> list[list[np.ndarray]]:
    """One FORWARD phase with an item per adapter; the per-datum logprobs of each item."""
    outcomes = engine.run_cycle(ops.Cycle(1, forward_items(data, backward)))
    assert all(outcome.error is None for outcome in outcomes), [outcome.error for outcome in outcomes]
    return [[output["logprobs"] for output in outcome.result.loss_fn_outputs] for outcome in outcomes]


def gradients(engine: Engine) -> dict[str, list[torch.Tensor | None]]:
    """Each adapter's parameters' current gradients (the tensors themselves)."""
    return {
        name: [param.grad for param in adapter.parameters()]
        for name, adapter in engine.residency.resident_runs().items()
    }


def clear_gradients(engine: Engine) -> None:
    for adapter in engine.residency.resident_runs().values():
        adapter.optimizer.zero_grad(set_to_none=True)
