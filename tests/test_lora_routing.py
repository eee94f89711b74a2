"""A multi-LoRA layer's batch against each row computed on its own: every way it batches the
adapters (grouped, rank-masked, gathered, segment by segment) gives each row its own adapter's
update and each adapter only its own rows' gradients, over an nn.Linear and over GPT-2's Conv1D
(weight [in, out])."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tinker_server.worker.lora import LoraPair, MultiLoRALinear, RowRouting, contiguous_segments

ROWS, POSITIONS = 9, 3


def layer_with(features: int, ranks: dict[str, int], conv1d: bool) -> MultiLoRALinear:
    generator = torch.Generator().manual_seed(0)
    base = Conv1D(features + 5, features) if conv1d else nn.Linear(features, features + 5)
    layer = MultiLoRALinear(base, RowRouting(), "mlp", "up_proj")
    for index, (name, rank) in enumerate(ranks.items()):
        a = torch.randn(rank, layer.in_features, generator=generator).requires_grad_()
        b = torch.randn(layer.out_features, rank, generator=generator).requires_grad_()
        layer.adapters[name] = LoraPair(a, b, scaling=0.5 + index)
    return layer


def row_by_row(layer: MultiLoRALinear, x: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
    """Each row alone: the base layer, plus its own adapter's scaled update."""
    outputs = []
    for row, name in zip(x, adapters, strict=True):
        out = layer.base(row)
        if name is not None:
            pair = layer.adapters[name]
            out = out + pair.scaling * (row @ pair.A.T) @ pair.B.T
        outputs.append(out)
    return torch.stack(outputs)


def gradients(layer: MultiLoRALinear, output: torch.Tensor) -> list[torch.Tensor]:
    pairs = list(layer.adapters.values())
    weights = torch.linspace(-1, 1, output.numel()).reshape(output.shape)
    return torch.autograd.grad((output * weights).sum(), [t for pair in pairs for t in (pair.A, pair.B)])


@pytest.mark.parametrize(
    ("features", "ranks", "adapters", "path"),
    [
        # Equal segments of one rank: batched over the adapters.
        (32, {"a": 4, "b": 4, "c": 4}, ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "_grouped_delta"),
        # Rows without an adapter, mixed ranks, one adapter in several segments: masked ranks.
        (32, {"a": 2, "b": 4}, ["a", "a", None, "b", "b", "b", "a", None, "b"], "_masked_delta"),
        # Ranks too wide beside the layer to run side by side: gathered per row, or segment by segment.
        (4, {"a": 3, "b": 3}, ["a", "b", "b", "a", "a", "a", "b", "b", "b"], "_gathered_delta"),
        (4, {"a": 2, "b": 3}, ["a", None, "b", "a", "a", None, "b", "b", "b"], None),
    ],
)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_every_batching_of_adapters_equals_each_row_through_its_own(
    features, ranks, adapters, path, conv1d, monkeypatch
):
    layer = layer_with(features, ranks, conv1d)
    taken: list[str] = []
    for name in ("_grouped_delta", "_masked_delta", "_gathered_delta"):
        method = getattr(layer, name)
        monkeypatch.setattr(
            layer, name, lambda *args, _method=method, _name=name: taken.append(_name) or _method(*args)
        )
    x = torch.randn(ROWS, POSITIONS, features, generator=torch.Generator().manual_seed(1))
    with layer.routing.route(contiguous_segments(adapters)):
        batched = layer(x)
    expected = row_by_row(layer, x, adapters)
    assert taken == ([path] if path else [])
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(gradients(layer, batched), gradients(layer, expected), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
