"""Multi-LoRA linear layers: one batch, each row through its own adapter.

peft's mixed-adapter batches are inference-only, so training many adapters in one pass
needs this layer. Rows of a batch are grouped by adapter; `RowRouting` says which rows
(a contiguous slice each) belong to which adapter, and every wrapped layer reads it.
The update of adapter a on its rows is  y = W x + (alpha / r) * B_a (A_a x).
Adapters are float32 whatever the base model's dtype: the update is computed in float32 and
added to the base layer's output in its dtype.
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
GATHER_BUDGET = 1 << 24
"""Most elements of per-row A and B copies a layer may gather (kept for backward); past it,
rows go through their adapters segment by segment instead."""


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
    generation: int = 0
    """Bumped on every `route`, so layers know when per-routing caches are stale."""

    @contextmanager
    def route(self, segments: list[RowSegment]) -> Iterator[None]:
        self.segments = segments
        self.generation += 1
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
        return ((x @ self.A.T) * self.scaling) @ self.B.T  # scale the rank-r intermediate: cheaper


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of named LoRA pairs, chosen per row."""

    def __init__(self, base: nn.Linear, routing: RowRouting, kind: str) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.kind = kind
        # Not registered as submodules: adapters stay out of the base model's parameters.
        self.adapters: dict[str, LoraPair] = {}
        self._index_generation = -1
        self._index = self._scaling = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, ..., in_features]; each segment's rows go through their own adapter."""
        out = self.base(x)
        delta = self._delta(x, out)
        return out if delta is None else out + delta.to(out.dtype)

    def _delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The adapters' update of `out`, in float32; None when no row has an adapter here."""
        pairs = [
            (segment, self.adapters.get(segment.adapter) if segment.adapter is not None else None)
            for segment in self.routing.segments
        ]
        if all(pair is None for _, pair in pairs):
            return None
        x = x.float()
        if len(pairs) == 1:
            return pairs[0][1].delta(x)
        ranks = {pair.A.shape[0] for _, pair in pairs if pair is not None}
        gathered = x.shape[0] * max(ranks) * (self.base.in_features + self.base.out_features)
        if all(pair is not None for _, pair in pairs) and len(ranks) == 1 and gathered <= GATHER_BUDGET:
            return self._gathered_delta(x, pairs)
        # Mixed ranks, or rows without this layer: one delta per segment, joined once.
        deltas = [
            pair.delta(x[segment.start : segment.stop])
            if pair
            else x.new_zeros(out[segment.start : segment.stop].shape)
            for segment, pair in pairs
        ]
        return torch.cat(deltas)

    def _gathered_delta(self, x: torch.Tensor, pairs: list[tuple[RowSegment, LoraPair]]) -> torch.Tensor:
        """All rows through their own adapters in two batched matmuls, however many adapters:
        each row gathers its adapter's A and B.          shapes: S adapters, R rows, r rank"""
        a = torch.stack([pair.A for _, pair in pairs])  # [S, r, in]
        b = torch.stack([pair.B for _, pair in pairs])  # [S, out, r]
        lengths = {segment.stop - segment.start for segment, _ in pairs}
        if len(lengths) == 1:  # equal segments: batch over adapters directly, nothing gathered
            groups = x.reshape(len(pairs), -1, x.shape[-1])  # [S, R/S * T, in]
            scales = torch.tensor([pair.scaling for _, pair in pairs], dtype=x.dtype, device=x.device)
            hidden = torch.bmm(groups, a.transpose(1, 2)) * scales.view(-1, 1, 1)  # [S, R/S * T, r]
            return torch.bmm(hidden, b.transpose(1, 2)).reshape(*x.shape[:-1], b.shape[1])
        index, scaling = self._row_index(pairs, x.device)  # [R], [R, 1, 1]
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [R, T, in]
        hidden = torch.bmm(rows, a[index].transpose(1, 2)) * scaling  # [R, T, r]
        return torch.bmm(hidden, b[index].transpose(1, 2)).reshape(*x.shape[:-1], b.shape[1])

    def _row_index(
        self, pairs: list[tuple[RowSegment, LoraPair]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's adapter and scaling; built once per routing (the whole forward pass)."""
        if self._index_generation != self.routing.generation:
            lengths = torch.tensor([segment.stop - segment.start for segment, _ in pairs])
            self._index = torch.repeat_interleave(torch.arange(len(pairs)), lengths).to(device)
            scales = torch.tensor([pair.scaling for _, pair in pairs], dtype=pairs[0][1].A.dtype)
            self._scaling = torch.repeat_interleave(scales, lengths).view(-1, 1, 1).to(device)
            self._index_generation = self.routing.generation
        return self._index, self._scaling


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
        a = torch.empty(spec.rank, base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b = torch.zeros(base.out_features, spec.rank, dtype=torch.float32)
        device = base.weight.device
        pairs[path] = LoraPair(
            A=nn.Parameter(a.to(device)), B=nn.Parameter(b.to(device)), scaling=spec.alpha / spec.rank
        )
    return pairs
