"""Multi-LoRA linear layers: one batch, each row through its own adapter.

peft's mixed-adapter batches are inference-only, so training many adapters in one pass
needs this layer. Rows of a batch are grouped by adapter; `RowRouting` says which rows
(a contiguous slice each) belong to which adapter, and every wrapped layer reads it.
The update of adapter a on its rows is  y = W x + (alpha / r) * B_a (A_a x).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from tinker_server.ops import LoraSpec

ATTN, MLP, UNEMBED = "attn", "mlp", "unembed"


@dataclass
class RowSegment:
    adapter: str | None
    """None: the rows see the bare base model."""
    start: int
    stop: int


@dataclass
class RowRouting:
    """Shared by every MultiLoRALinear of a model; set around each forward pass."""

    segments: list[RowSegment] = field(default_factory=list)

    @contextmanager
    def route(self, segments: list[RowSegment]) -> Iterator[None]:
        self.segments = segments
        try:
            yield
        finally:
            self.segments = []


def contiguous_segments(adapters: Sequence[str | None]) -> list[RowSegment]:
    """Runs of equal adapter names; rows must already be grouped by adapter."""
    segments: list[RowSegment] = []
    for row, adapter in enumerate(adapters):
        if segments and segments[-1].adapter == adapter:
            segments[-1].stop = row + 1
        else:
            segments.append(RowSegment(adapter, row, row + 1))
    return segments


@dataclass
class LoraPair:
    A: torch.Tensor  # [r, in_features]
    B: torch.Tensor  # [out_features, r]
    scaling: float

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.T) @ self.B.T * self.scaling


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of named LoRA pairs, chosen per row."""

    def __init__(self, base: nn.Linear, routing: RowRouting, kind: str) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.kind = kind
        # Not registered as submodules: adapters stay out of the base model's parameters.
        self.adapters: dict[str, LoraPair] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        deltas: list[torch.Tensor] = []
        any_adapter = False
        for segment in self.routing.segments:
            pair = self.adapters.get(segment.adapter) if segment.adapter is not None else None
            rows = slice(segment.start, segment.stop)
            if pair is None:
                deltas.append(out.new_zeros(out[rows].shape))
            else:
                deltas.append(pair.delta(x[rows]))
                any_adapter = True
        if not any_adapter:
            return out
        return out + torch.cat(deltas, dim=0)


def layer_kind(module_path: str, model: nn.Module) -> str | None:
    """Which LoRA flag covers a linear layer: attention, MLP, the unembedding, or none."""
    if model.get_output_embeddings() is model.get_submodule(module_path):
        return UNEMBED
    parent = module_path.rsplit(".", 1)[0].lower() if "." in module_path else ""
    leaf = parent.rsplit(".", 1)[-1]
    if "attn" in leaf or "attention" in leaf:
        return ATTN
    if "mlp" in leaf or "feed_forward" in leaf or "ffn" in leaf:
        return MLP
    return None


def wrap_linear_layers(model: nn.Module, routing: RowRouting) -> dict[str, MultiLoRALinear]:
    """Replaces every attention, MLP and unembedding nn.Linear with a MultiLoRALinear."""
    targets = [
        (path, module, kind)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and (kind := layer_kind(path, model)) is not None
    ]
    wrapped: dict[str, MultiLoRALinear] = {}
    for path, module, kind in targets:
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = MultiLoRALinear(module, routing, kind)
        setattr(parent, attribute, layer)
        wrapped[path] = layer
    return wrapped


def trained_kinds(spec: LoraSpec) -> set[str]:
    return {
        kind
        for kind, enabled in ((ATTN, spec.train_attn), (MLP, spec.train_mlp), (UNEMBED, spec.train_unembed))
        if enabled
    }


def init_lora_pairs(layers: dict[str, MultiLoRALinear], spec: LoraSpec) -> dict[str, LoraPair]:
    """peft's default init, seeded: A ~ kaiming_uniform(a=sqrt(5)), B = 0.

    Layers are visited in sorted path order so that one seed gives one adapter.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    kinds = trained_kinds(spec)
    pairs: dict[str, LoraPair] = {}
    for path in sorted(layers):
        layer = layers[path]
        if layer.kind not in kinds:
            continue
        base = layer.base
        a = torch.empty(spec.rank, base.in_features, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b = torch.zeros(base.out_features, spec.rank, dtype=base.weight.dtype)
        device = base.weight.device
        pairs[path] = LoraPair(
            A=nn.Parameter(a.to(device)), B=nn.Parameter(b.to(device)), scaling=spec.alpha / spec.rank
        )
    return pairs
