"""Memory-bounded training passes: logits a chunk of positions at a time, decoder layers
recomputed in backward on request, and gradients that a failed phase leaves as they were.

Each piece keeps the numbers of the plain computation: checkpointing recomputes exactly what
the forward computed (the model stays in eval mode, so no dropout makes the two differ).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from tinker_server.worker.models import output_logits

LOGITS_CHUNK_ELEMENTS = 1 << 24
"""Logits (rows x positions x vocabulary) computed at once: 64 MiB in float32."""


def target_logprobs(model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t, k] | tokens[b, :t+1]), float32 [B, T, K], from the decoder's last hidden
    states [B, T, H]: a chunk of positions at a time (all rows, so the output embedding's row
    routing holds), so the [B, T, V] logits never exist at once. With gradients on, each chunk is
    checkpointed: backward recomputes its logits instead of keeping them."""
    rows, positions, _ = hidden.shape
    width = max(1, LOGITS_CHUNK_ELEMENTS // (rows * model.config.get_text_config().vocab_size))
    chunks = []
    for start in range(0, positions, width):
        chunk = (model, hidden[:, start : start + width], targets[:, start : start + width])
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_chunk_logprobs, *chunk, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(*chunk))
    return torch.cat(chunks, dim=1)


def _chunk_logprobs(model: PreTrainedModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Contiguous, the chunk multiplies as one matrix rather than as a batch over an expanded weight
    # (mm, not bmm): about 8% faster on a CPU. A copy of [B, c, H], made again when recomputed.
    return _TargetLogprobs.apply(output_logits(model, hidden.contiguous()), targets)


class _TargetLogprobs(torch.autograd.Function):
    """log_softmax(logits).gather(targets) for float32 logits [B, c, V]; the backward turns the
    saved log-softmax into the logits' gradient in place, allocating nothing V-sized. (Autograd's
    logsumexp and gather take five V-sized temporaries: on a CPU, bench/memory.py's 1x4096 pass
    took a quarter longer with them.)"""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(logprobs, targets)
        return logprobs.gather(-1, targets)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logprobs, targets = ctx.saved_tensors  # used once: the graph is never retained
        # d/dlogits sum_k g_k log p(t_k) = onehot-scatter of g - p * sum_k g_k
        return logprobs.exp_().mul_(-grad.sum(-1, keepdim=True)).scatter_add_(-1, targets, grad), None


@contextmanager
def gradients_all_or_nothing(trained: Sequence[torch.Tensor], read: Sequence[torch.Tensor]) -> Iterator[None]:
    """Around a phase of passes: the gradients they compute reach the `trained` parameters only
    if the whole phase succeeds; on any failure every parameter gets back the very gradient it
    had. Parameters only `read` (adapters of forward-only rows, which share the passes and so
    receive zeros) always get theirs back: a forward never changes a gradient."""
    params = list({id(param): param for param in [*trained, *read]}.values())
    kept = [param.grad for param in params]
    for param in params:
        param.grad = None  # the passes accumulate into fresh gradients
    try:
        yield
    except BaseException:
        for param, grad in zip(params, kept, strict=True):
            param.grad = grad
        raise
    trained_ids = {id(param) for param in trained}
    for param, grad in zip(params, kept, strict=True):
        if id(param) not in trained_ids or param.grad is None:
            param.grad = grad
        elif grad is not None:
            param.grad.add_(grad)


class _CheckpointedLayer:
    """A decoder layer as the model's layer loop sees it: called through torch.utils.checkpoint
    while gradients are on; every attribute is the layer's."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __getattr__(self, name: str) -> object:
        return getattr(self.layer, name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        if torch.is_grad_enabled():
            return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
        return self.layer(*args, **kwargs)


class CheckpointedLayers(nn.ModuleList):
    """The decoder's layer list, handing out checkpointed layers to the loop that runs them. The
    layers stay registered where they were: module paths and the state dict do not change, and
    the model is never switched to train mode (transformers' own gradient checkpointing needs it)."""

    def __iter__(self) -> Iterator[nn.Module]:
        return (_CheckpointedLayer(layer) for layer in super().__iter__())

    def __getitem__(self, index: int | slice) -> nn.Module | nn.ModuleList:
        item = super().__getitem__(index)  # a slice is a CheckpointedLayers too
        return item if isinstance(index, slice) else _CheckpointedLayer(item)


def checkpoint_decoder_layers(model: PreTrainedModel) -> None:
    """Makes the decoder recompute each layer's activations in backward instead of keeping them.
    The layer stack is the outermost nn.ModuleList with one entry per hidden layer."""
    count = model.config.get_text_config().num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            parent_path, _, attribute = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attribute, CheckpointedLayers(module))
            return
    raise ValueError(f"--activation-checkpointing: no list of {count} decoder layers in {type(model).__name__}")
