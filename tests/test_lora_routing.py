"""A multi-LoRA layer's batch against each row computed on its own: every way it batches the
adapters (grouped, rank-masked, gathered, segment by segment) gives each row its own adapter's
update and each adapter only its own rows' gradients, over an nn.Linear and over GPT-2's Conv1D
(weight [in, out])."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tinker_server.worker import lora
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


def gradients(layer: MultiLoRALinear, output: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """Of every adapter's A and B, and of the layer's input (the update is added to the base
    layer's output in place: the input's gradient must still see both)."""
    pairs = list(layer.adapters.values())
    weights = torch.linspace(-1, 1, output.numel()).reshape(output.shape)
    return torch.autograd.grad((output * weights).sum(), [t for pair in pairs for t in (pair.A, pair.B)] + [x])


@pytest.mark.parametrize(
    ("features", "ranks", "adapters", "path"),
    [
        # Equal segments of one rank: batched over the adapters.
        (32, {"a": 4, "b": 4, "c": 4}, ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "_grouped_delta"),
        # Rows without an adapter, mixed ranks, one adapter in several segments: masked ranks.
        (32, {"a": 2, "b": 4}, ["a", "a", None, "b", "b", "b", "a", None, "b"], "_masked_delta"),
        (32, {"a": 4}, [None, "a", "a", None, None, "a", "a", "a", None], "_masked_delta"),  # one adapter
        # Ranks too wide beside the layer to run side by side: gathered per row, or segment by segment.
        (4, {"a": 3, "b": 3}, ["a", "b", "b", "a", "a", "a", "b", "b", "b"], "_gathered_delta"),
        (4, {"a": 2, "b": 3}, ["a", None, "b", "a", "a", None, "b", "b", "b"], None),
        # One adapter on every row.
        (32, {"a": 4}, ["a"] * ROWS, None),
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
    x = torch.randn(ROWS, POSITIONS, features, generator=torch.Generator().manual_seed(1)).requires_grad_()
    with layer.routing.route(contiguous_segments(adapters)):
        batched = layer(x)
    expected = row_by_row(layer, x, adapters)
    assert taken == ([path] if path else [])
    torch.testing.assert_close(batched, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(gradients(layer, batched, x), gradients(layer, expected, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("features", "ranks", "adapters", "copies"),
    [
        (32, {"a": 4, "b": 4, "c": 4}, ["a"] * 3 + ["b"] * 3 + ["c"] * 3, 1),  # grouped: the segments' scalings
        (32, {"a": 2, "b": 4}, ["a", "a", None, "b", "b", "b", "a", None, "b"], 1),  # masked: the rank mask
        (4, {"a": 3, "b": 3}, ["a", "b", "b", "a", "a", "a", "b", "b", "b"], 2),  # gathered: row index, scalings
    ],
)
def test_the_layers_of_a_pass_copy_what_they_derive_from_its_routing_once(
    features, ranks, adapters, copies, monkeypatch
):
    """Row indices, rank masks and scalings depend on the routing alone: the first layer of a
    forward pass copies them to the device, the others share them; the next pass copies again."""
    routing = RowRouting()
    layers = [layer_with(features, ranks, conv1d=False) for _ in range(3)]
    for layer in layers:
        layer.routing = routing
    made: list[torch.Tensor] = []
    monkeypatch.setattr(lora, "to_device", lambda tensor, device: made.append(tensor) or tensor.to(device))
    x = torch.randn(ROWS, POSITIONS, features)
    for _ in range(2):
        with torch.no_grad(), routing.route(contiguous_segments(adapters)):
            for layer in layers:
                layer(x)
    assert len(made) == 2 * copies


@pytest.mark.parametrize("adapters", [["a"] * ROWS, ["a", "a", None, "b", "b", "b", "a", None, "b"]])
def test_a_bfloat16_layer_gets_the_float32_update_rounded_once(adapters):
    """The update is computed in float32 and added to the base layer's bfloat16 output rounding
    once (as peft adds it): every output is within half a bfloat16 step of the float32 sum."""
    layer = layer_with(32, {"a": 2, "b": 4}, conv1d=False)
    layer.base.to(torch.bfloat16)
    x = torch.randn(ROWS, POSITIONS, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad(), layer.routing.route(contiguous_segments(adapters)):
        batched = layer(x)
        exact = torch.stack(
            [
                layer.base(row).float() + (layer.adapters[name].delta(row.float()) if name else 0)
                for row, name in zip(x, adapters, strict=True)
            ]
        )
    assert batched.dtype == torch.bfloat16
    torch.testing.assert_close(batched.float(), exact, rtol=2**-8 * 1.01, atol=1e-6)


def test_projections_reading_one_bfloat16_input_share_its_float32_cast(monkeypatch):
    """q, k and v (or gate and up) read the same input: it is cast once for their updates, and
    again once it has changed in place, with the gradients of separate casts."""
    routing = RowRouting()
    layers = []
    for seed in range(3):
        layer = layer_with(32, {"a": 2}, conv1d=False)
        layer.routing = routing
        layer.base.to(torch.bfloat16)
        layer.adapters["a"].A.data += seed  # three projections, three adapters
        layers.append(layer)
    x = torch.randn(ROWS, POSITIONS, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x.requires_grad_()
    casts = []
    to = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda tensor: casts.append(tensor) or to(tensor))
    with routing.route(contiguous_segments(["a"] * ROWS)):
        outputs = [layer(x) for layer in layers]
        assert len(casts) == 1
        changed = x.detach().clone()
        layers[0](changed), changed.mul_(2), layers[1](changed)
        assert len(casts) == 3  # a new input, then the same one changed in place
    monkeypatch.undo()
    expected = [layer.base(x) + layer.adapters["a"].delta(x.float()).to(torch.bfloat16) for layer in layers]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-2)
    weights = torch.linspace(-1, 1, outputs[0].numel()).reshape(outputs[0].shape).to(torch.bfloat16)
    shared = torch.autograd.grad(sum((output * weights).sum() for output in outputs), x)[0]
    separate = torch.autograd.grad(sum((output * weights).sum() for output in expected), x)[0]
    # The shared cast sums the three gradients in float32, separate casts in bfloat16: a few of its
    # steps apart at most, where one projection's gradient lost would be off by about its size.
    torch.testing.assert_close(shared, separate, rtol=2**-5, atol=0.1)
