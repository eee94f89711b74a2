"""Custom losses: your own torch loss of the per-token logprobs, carried into the adapter by
a linearized cross-entropy backward (TrainingClient.forward_backward_custom)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tinker_client import types

if TYPE_CHECKING:
    import torch

CustomLossFn = Callable[[list[types.Datum], list["torch.Tensor"]], tuple["torch.Tensor", dict[str, float]]]
"""`loss_fn(data, logprobs_list) -> (loss, metrics)`: the batch's loss of its logprobs."""

PerDatumLossFn = Callable[..., tuple["torch.Tensor", Mapping[str, "torch.Tensor"]]]
"""`fn(logprobs, *inputs) -> (scalar loss, {"custom/<name>:sum" or ":mean": scalar})` for one
datum; `inputs` are the datum's loss_fn_inputs named by the function's parameters."""


@dataclass(frozen=True)
class LossHandle:
    """A per-datum loss made by `ServiceClient.create_custom_loss`, for forward_backward_custom.

    It runs here, in the client, once per datum; the server sees only its gradient.
    """

    name: str
    inputs: tuple[types.CustomLossInput, ...]
    """`logprobs`, then the loss_fn_inputs keys the loss reads, in order, with their ranks."""
    session_id: str
    graph: Any = field(repr=False, compare=False)
    """The loss, traced by torch.fx: what runs."""
    loss_id: str | None = None
    """The hosted service's id of an uploaded loss; always None here (losses run client-side)."""

    @property
    def key(self) -> str:
        return f"{self.name}:{hash(self.graph.code)}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(loss_input.name for loss_input in self.inputs[1:])

    def check_inputs(self, data: list[types.Datum]) -> None:
        """Every datum has each input the loss reads, at its declared rank."""
        logprobs, *inputs = self.inputs
        for index, datum in enumerate(data):
            for loss_input, key in [(logprobs, "target_tokens"), *((item, item.name) for item in inputs)]:
                if key not in datum.loss_fn_inputs:
                    raise ValueError(f"data[{index}] has no loss_fn_inputs[{key!r}], which loss {self.name!r} takes")
                rank = len(datum.loss_fn_inputs[key].shape or [0])
                if rank != loss_input.rank:
                    raise ValueError(
                        f"data[{index}].loss_fn_inputs[{key!r}] has rank {rank}; loss {self.name!r} "
                        f"declared {loss_input.name} with rank {loss_input.rank}"
                    )

    def __call__(self, data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The batch loss: the sum of the per-datum losses; metrics summed or averaged by suffix."""
        import torch

        losses, metrics = [], []
        for datum, datum_logprobs in zip(data, logprobs, strict=True):
            inputs = [datum.loss_fn_inputs[name].to_torch() for name in self.input_names]
            loss, datum_metrics = self.graph(datum_logprobs, *inputs)
            losses.append(loss)
            metrics.append({key: _number(value) for key, value in datum_metrics.items()})
        return torch.stack(losses).sum(), _combine(metrics)


def _number(value: object) -> float:
    """A metric as a float; a tensor still tracking gradients (a loss returned as its own metric)
    is detached first, without PyTorch's warning about it."""
    return float(value.detach()) if hasattr(value, "detach") else float(value)  # type: ignore[arg-type]


def _combine(metrics: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(key for entry in metrics for key in entry)
    combined = {}
    for key in keys:
        values = [entry[key] for entry in metrics if key in entry]
        combined[key] = sum(values) / len(values) if key.endswith(":mean") else sum(values)
    return combined


def trace_loss(fn: PerDatumLossFn, input_ranks: Mapping[str, types.CustomLossInputRank], session_id: str) -> LossHandle:
    """Traces `fn` with torch.fx (so a loss that branches on tensor values is refused now,
    not in the middle of training) and checks that it declares each input's rank."""
    import torch.fx

    parameters = list(inspect.signature(fn).parameters)
    if not parameters:
        raise ValueError("create_custom_loss: the loss takes logprobs first, then the loss_fn_inputs it reads")
    names = parameters[1:]
    missing = sorted(set(names) - set(input_ranks))
    unknown = sorted(set(input_ranks) - set(names) - {"logprobs"})
    if missing or unknown:
        raise ValueError(
            f"create_custom_loss: input_ranks must give the rank of each input {names}; "
            f"missing {missing}, not taken by {fn.__name__}: {unknown}"
        )
    try:
        graph = torch.fx.symbolic_trace(fn)
    except Exception as error:
        raise ValueError(f"create_custom_loss: {fn.__name__} cannot be traced by torch.fx: {error}") from error
    inputs = (
        types.CustomLossInput("logprobs", input_ranks.get("logprobs", 1)),
        *(types.CustomLossInput(name, input_ranks[name]) for name in names),
    )
    return LossHandle(name=fn.__name__, inputs=inputs, session_id=session_id, graph=graph)


def linearize(
    data: list[types.Datum], loss_fn: CustomLossFn | LossHandle, forward: types.ForwardBackwardOutput
) -> tuple[list[types.Datum], float, dict[str, float]]:
    """Evaluates the loss on the forward's logprobs and turns its gradient into cross-entropy
    weights: cross_entropy's loss is -sum(weights * logprobs), so weights = -dL/dlogprobs
    carries dL into the adapter."""
    import torch

    logprobs = [output["logprobs"].to_torch().clone().requires_grad_(True) for output in forward.loss_fn_outputs]
    loss, metrics = loss_fn(data, logprobs)
    grads = torch.autograd.grad(loss, logprobs, allow_unused=True)
    linearized = [
        types.Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": types.TensorData.from_torch(-(torch.zeros_like(lp) if grad is None else grad).float()),
            },
        )
        for datum, lp, grad in zip(data, logprobs, grads, strict=True)
    ]
    return linearized, float(loss.detach()), dict(metrics)
