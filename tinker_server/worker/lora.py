"""Multi-LoRA layers: one batch, each row through its own adapter.

peft's mixed-adapter batches are inference-only, so training many adapters in one pass
needs these layers. Rows of a batch are grouped by adapter; `RowRouting` says which rows
(a contiguous slice each) belong to which adapter, and every wrapped layer reads it.
The update of adapter a on its rows is  y = W x + (alpha / r) * B_a (A_a x).
A fused mixture-of-experts layer gets one such update per expert (A_a[e], B_a[e]), applied
to the tokens routed to expert e, each token with its own row's adapter.
Adapters are float32 whatever the base model's dtype: the update is computed in float32 and
added to the base layer's output in its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from tinker_server.ops import LoraSpec
from tinker_server.worker.transfers import to_device

ATTN, MLP, UNEMBED = "attn", "mlp", "unembed"
T = TypeVar("T")
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
    adapted: bool = False
    """Whether any segment names an adapter (else every row sees the bare base model)."""
    _derived: dict[object, Any] = field(default_factory=dict)
    """What layers derive from the routing alone (see `derived`); `route` clears it."""
    _float_input: tuple[torch.Tensor, int, torch.Tensor] | None = None
    """The last input cast to float32, its version then, and the cast (see `float_input`)."""

    @contextmanager
    def route(self, segments: list[RowSegment]) -> Iterator[None]:
        self.segments = segments
        self.adapted = any(segment.adapter is not None for segment in segments)
        self._derived.clear()
        try:
            yield
        finally:
            self.segments, self.adapted = [], False
            self._float_input = None

    def derived(self, key: object, build: Callable[[], T]) -> T:
        """What `build` derives from this routing (row indices, masks, scalings on the device),
        built by the first layer of the forward pass that asks and shared by every other: one
        copy to the device per pass, not one per layer."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def float_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in float32, for the adapters' updates: cast once for the projections that read the
        same input one after another (q, k and v; gate and up), not once each. Only the latest
        input is kept, so nothing is held past the layer that reads it next."""
        if x.dtype == torch.float32:
            return x
        cached = self._float_input
        if cached is None or cached[0] is not x or cached[1] != x._version:  # (a new input, or changed in place)
            cached = self._float_input = (x, x._version, x.float())
        return cached[2]


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
    A: torch.Tensor  # [r, in_features], or [experts, r, in_features]
    B: torch.Tensor  # [out_features, r], or [experts, out_features, r]
    scaling: float

    def delta(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        a, b = (self.A, self.B) if expert is None else (self.A[expert], self.B[expert])
        return ((x @ a.T) * self.scaling) @ b.T  # scale the rank-r intermediate: cheaper

    def add_update(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out += scaling * B (A x), in place: the scaling and the cast to out's dtype ride on the add."""
        out.add_((x @ self.A.T) @ self.B.T, alpha=self.scaling)


class LoraSite:
    """A weight that adapters can adapt: its path (in peft's naming), the flag that covers
    it, its shape, and the adapters attached to it by name."""

    path: str
    kind: str
    in_features: int
    out_features: int
    experts: int = 0
    """0 for a matrix; E for a fused [E, ...] expert parameter (one LoRA per expert)."""
    adapters: dict[str, LoraPair]

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of A and B for this site."""
        stack = (self.experts,) if self.experts else ()
        return (*stack, rank, self.in_features), (*stack, self.out_features, rank)


class MultiLoRALinear(nn.Module, LoraSite):
    """A frozen nn.Linear (or GPT-2's Conv1D, weight [in, out]) plus any number of named LoRA
    pairs, chosen per row."""

    def __init__(self, base: nn.Module, routing: RowRouting, kind: str, path: str) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        self.kind = kind
        self.path = path
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        """GPT-2's Conv1D computes x @ W + b, with W [in, out] (peft's fan_in_fan_out)."""
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        # Not registered as submodules: adapters stay out of the base model's parameters.
        self.adapters: dict[str, LoraPair] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, ..., in_features]; each segment's rows go through their own adapter."""
        out = self.base.forward(x)  # (not through its __call__: no hooks to run, one dispatch less per layer)
        if not self.routing.adapted:  # the bare base model on every row: nothing to look up
            return out
        pairs = [
            (segment, self.adapters.get(segment.adapter) if segment.adapter is not None else None)
            for segment in self.routing.segments
        ]
        if any(pair is not None for _, pair in pairs):
            self._add_updates(out, self.routing.float_input(x), pairs)
        return out

    def _add_updates(self, out: torch.Tensor, x: torch.Tensor, pairs: list[tuple[RowSegment, LoraPair | None]]) -> None:
        """Adds the adapters' updates, computed in float32, to `out` in place: cast to its dtype as
        they are added (one kernel, where adding a copy cast first took two). The base layer's
        output is its own, and nothing its backward needs."""
        if len(pairs) == 1:
            pairs[0][1].add_update(out, x)
            return
        delta = self._batched_delta(x, pairs)
        if delta is not None:
            out.add_(delta)
            return
        # Many adapters of mixed ranks, or rows without this layer: segment by segment.
        for segment, pair in pairs:
            if pair is not None:
                pair.add_update(out[segment.start : segment.stop], x[segment.start : segment.stop])

    def _batched_delta(self, x: torch.Tensor, pairs: list[tuple[RowSegment, LoraPair | None]]) -> torch.Tensor | None:
        """Every segment's update in one batched computation, where one suits the batch; else None."""
        every_row_adapted = all(pair is not None for _, pair in pairs)
        ranks = {pair.A.shape[0] for _, pair in pairs if pair is not None}
        lengths = {segment.stop - segment.start for segment, _ in pairs}
        if every_row_adapted and len(ranks) == 1 and len(lengths) == 1:
            return self._grouped_delta(x, pairs)
        distinct = {segment.adapter: pair for segment, pair in pairs if pair is not None}
        concatenated_rank = sum(pair.A.shape[0] for pair in distinct.values())
        if concatenated_rank * (self.in_features + self.out_features) <= self.in_features * self.out_features // 2:
            return self._masked_delta(x, pairs, distinct)
        gathered = x.shape[0] * max(ranks) * (self.in_features + self.out_features)
        if every_row_adapted and len(ranks) == 1 and gathered <= GATHER_BUDGET:
            return self._gathered_delta(x, pairs)
        return None

    def _grouped_delta(self, x: torch.Tensor, pairs: list[tuple[RowSegment, LoraPair]]) -> torch.Tensor:
        """Equal segments, one rank: batched over the adapters directly, nothing gathered or wasted.
        shapes: S adapters, R rows, T positions, r rank"""
        a = torch.stack([pair.A for _, pair in pairs])  # [S, r, in]
        b = torch.stack([pair.B for _, pair in pairs])  # [S, out, r]
        groups = x.reshape(len(pairs), -1, x.shape[-1])  # [S, R/S * T, in]
        scalings = tuple(pair.scaling for _, pair in pairs)
        scales = self.routing.derived(
            ("segment scalings", scalings, x.dtype), lambda: to_device(torch.tensor(scalings, dtype=x.dtype), x.device)
        )
        hidden = torch.bmm(groups, a.transpose(1, 2)) * scales.view(-1, 1, 1)  # [S, R/S * T, r]
        return torch.bmm(hidden, b.transpose(1, 2)).reshape(*x.shape[:-1], b.shape[1])

    def _masked_delta(
        self, x: torch.Tensor, pairs: list[tuple[RowSegment, LoraPair | None]], distinct: dict[str, LoraPair]
    ) -> torch.Tensor:
        """Every row through the batch's adapters side by side (their A and B concatenated along the
        rank), each row's rank-space activations masked to its own adapter's (times its scaling, zero
        for rows without one): two matmuls however many segments and ranks, for K/r times a row's
        own rank-r work.                                     shapes: R rows, K concatenated ranks"""
        adapters = list(distinct.values())
        if len(adapters) == 1:  # one adapter beside rows without one: its own A and B, not copies
            a, b = adapters[0].A, adapters[0].B
        else:
            a = torch.cat([pair.A for pair in adapters])  # [K, in]
            b = torch.cat([pair.B for pair in adapters], 1)  # [out, K]
        key = ("rank mask", tuple((name, pair.A.shape[0], pair.scaling) for name, pair in distinct.items()))
        mask = self.routing.derived(key, lambda: self._rank_mask(pairs, distinct, x.device))  # [R, K]
        hidden = (x @ a.T) * mask.view(mask.shape[0], *(1,) * (x.dim() - 2), mask.shape[1])
        return hidden @ b.T

    @staticmethod
    def _rank_mask(
        pairs: list[tuple[RowSegment, LoraPair | None]], distinct: dict[str, LoraPair], device: torch.device
    ) -> torch.Tensor:
        offsets, offset = {}, 0
        for name, pair in distinct.items():
            offsets[name], offset = offset, offset + pair.A.shape[0]
        mask = torch.zeros((pairs[-1][0].stop, offset))
        for segment, pair in pairs:
            if pair is not None:
                start = offsets[segment.adapter]
                mask[segment.start : segment.stop, start : start + pair.A.shape[0]] = pair.scaling
        return to_device(mask, device)

    def _gathered_delta(self, x: torch.Tensor, pairs: list[tuple[RowSegment, LoraPair]]) -> torch.Tensor:
        """All rows through their own adapters in two batched matmuls, however many adapters:
        each row gathers its adapter's A and B.          shapes: S adapters, R rows, r rank"""
        a = torch.stack([pair.A for _, pair in pairs])  # [S, r, in]
        b = torch.stack([pair.B for _, pair in pairs])  # [S, out, r]
        index, scaling = self._row_index(pairs, x.device)  # [R], [R, 1, 1]
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [R, T, in]
        hidden = torch.bmm(rows, a[index].transpose(1, 2)) * scaling  # [R, T, r]
        return torch.bmm(hidden, b[index].transpose(1, 2)).reshape(*x.shape[:-1], b.shape[1])

    def _row_index(
        self, pairs: list[tuple[RowSegment, LoraPair]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's adapter and scaling."""
        scalings = tuple(pair.scaling for _, pair in pairs)

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            lengths = torch.tensor([segment.stop - segment.start for segment, _ in pairs])
            index = torch.repeat_interleave(torch.arange(len(pairs)), lengths)
            scales = torch.repeat_interleave(torch.tensor(scalings, dtype=pairs[0][1].A.dtype), lengths)
            return to_device(index, device), to_device(scales.view(-1, 1, 1), device)

        return self.routing.derived(("row index", scalings), build)


def trained_kinds(spec: LoraSpec) -> set[str]:
    return {
        kind
        for kind, enabled in ((ATTN, spec.train_attn), (MLP, spec.train_mlp), (UNEMBED, spec.train_unembed))
        if enabled
    }


def init_lora_pairs(sites: dict[str, LoraSite], spec: LoraSpec, device: torch.device) -> dict[str, LoraPair]:
    """peft's default init, seeded: A ~ kaiming_uniform(a=sqrt(5)) (per expert), B = 0.

    Sites are visited in sorted path order so that one seed gives one adapter.
    """
    generator = torch.Generator().manual_seed(spec.seed)
    kinds = trained_kinds(spec)
    pairs: dict[str, LoraPair] = {}
    for path in sorted(sites):
        site = sites[path]
        if site.kind not in kinds:
            continue
        a_shape, b_shape = site.lora_shapes(spec.rank)
        a = torch.empty(a_shape, dtype=torch.float32)
        for matrix in a.reshape(-1, *a_shape[-2:]):  # fan-in of one expert's A, as peft has it
            nn.init.kaiming_uniform_(matrix, a=math.sqrt(5), generator=generator)
        b = torch.zeros(b_shape, dtype=torch.float32)
        pairs[path] = LoraPair(
            A=nn.Parameter(a.to(device)), B=nn.Parameter(b.to(device)), scaling=spec.alpha / spec.rank
        )
    return pairs


class MultiLoRAExperts(nn.Module):
    """A fused mixture-of-experts module (transformers' experts protocol: 3-D `gate_up_proj` /
    `up_proj` and `down_proj`, optional biases, `is_transposed`, `_apply_gate`) whose expert
    projections take per-expert LoRA updates, each token through its own row's adapter.

    The expert loop mirrors transformers' eager experts forward, with each projection
    x @ W_e (+ bias_e) followed by the adapters' updates of the tokens that reach expert e.
    """

    def __init__(self, experts: nn.Module, routing: RowRouting, sites: dict[str, ExpertSite]) -> None:
        super().__init__()
        self.experts = experts
        self.routing = routing
        self.sites = sites  # by parameter name

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        experts = self.experts
        adapter_of_token = self._adapter_of_token(hidden_states.shape[0], hidden_states.device)
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        first = "gate_up_proj" if experts.has_gate else "up_proj"
        for expert in hit[:, 0].tolist():
            if expert == experts.num_experts:
                continue
            top_k_position, tokens = torch.where(mask[expert])
            adapters = adapter_of_token[tokens] if adapter_of_token is not None else None
            hidden = self._project(first, expert, hidden_states[tokens], adapters)
            hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
            out = self._project("down_proj", expert, hidden, adapters)
            out = out * top_k_weights[tokens, top_k_position, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final

    def _adapter_of_token(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        """Index (into the routing's segments) of each flattened token's row, on the device of the
        tokens (whose expert indices select from it); None without routing."""
        segments = self.routing.segments
        if not segments:
            return None

        def build() -> torch.Tensor:
            per_row = tokens // segments[-1].stop  # rows are flattened [rows * positions, hidden]
            lengths = torch.tensor([(segment.stop - segment.start) * per_row for segment in segments])
            return to_device(torch.repeat_interleave(torch.arange(len(segments)), lengths), device)

        return self.routing.derived(("token adapters", tokens), build)

    def _project(self, name: str, expert: int, x: torch.Tensor, adapters: torch.Tensor | None) -> torch.Tensor:
        experts = self.experts
        weight = getattr(experts, name)[expert]
        out = x @ weight if experts.is_transposed else nn.functional.linear(x, weight)
        if experts.has_bias:
            out = out + getattr(experts, f"{name}_bias")[expert]
        site = self.sites.get(name)
        if site is None or adapters is None:
            return out
        for index, segment in enumerate(self.routing.segments):
            pair = site.adapters.get(segment.adapter) if segment.adapter is not None else None
            rows = (adapters == index).nonzero()[:, 0]
            if pair is not None and len(rows):
                update = pair.delta(x[rows].float(), expert).to(out.dtype)
                out = out.index_add(0, rows, update)
        return out


@dataclass(eq=False)
class ExpertSite(LoraSite):
    """One fused expert parameter of a MultiLoRAExperts module."""

    path: str
    kind: str
    in_features: int
    out_features: int
    experts: int
    adapters: dict[str, LoraPair] = field(default_factory=dict)
