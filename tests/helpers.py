"""Test helpers: raw protocol sessions, example data, and plain-torch references."""

from __future__ import annotations

import queue
from pathlib import Path

import grpc
import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tinker_client import types
from tinker_rpc.v1 import service_pb2, service_pb2_grpc
from tinker_server.worker.models import build_embedded_model


class RawSession:
    """A Session stream driven message by message, to check the protocol itself."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = service_pb2_grpc.TinkerServiceStub(self.channel)
        self._requests: queue.Queue[service_pb2.SessionRequest | None] = queue.Queue()
        self._responses = self.stub.Session(iter(self._requests.get, None))

    def send(self, request: service_pb2.SessionRequest) -> None:
        self._requests.put(request)

    def receive(self) -> service_pb2.SessionResponse:
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(None)
        self.channel.close()


def ragged_batch(seed: int, lengths: list[int], vocab: int = 256) -> list[types.Datum]:
    """Random next-token examples of the given lengths, with random per-token weights."""
    rng = np.random.default_rng(seed)
    data = []
    for length in lengths:
        tokens = rng.integers(0, vocab, size=length + 1)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1].tolist()),
                loss_fn_inputs={
                    "target_tokens": tokens[1:].astype(np.int64),
                    "weights": rng.uniform(0.0, 1.0, size=length).astype(np.float32),
                },
            )
        )
    return data


def reference_logprobs(model: torch.nn.Module, datum: types.Datum) -> torch.Tensor:
    """log p(target_i | tokens[:i+1]) by a plain forward pass, one sequence, no batching."""
    tokens = torch.tensor(datum.model_input.to_ints())[None]
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
    logits = model(input_ids=tokens).logits[0].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def reference_cross_entropy(model: torch.nn.Module, data: list[types.Datum]) -> torch.Tensor:
    return sum(-(reference_logprobs(model, datum) * datum.loss_fn_inputs["weights"].to_torch()).sum() for datum in data)


def sampler_dir(data_dir: Path, sampler_path: str) -> Path:
    """Where the server wrote a sampler snapshot: runs/<model_id>/sampler_weights/<name>."""
    model_id, _, name = sampler_path.removeprefix("tinker://").partition("/sampler_weights/")
    return data_dir / "runs" / model_id / "sampler_weights" / name


def peft_model(adapter_dir: Path, trainable: bool = False) -> PeftModel:
    """The embedded base model with a saved adapter, loaded by peft itself."""
    return PeftModel.from_pretrained(build_embedded_model(), str(adapter_dir), is_trainable=trainable)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def read_gradients(training, data_dir: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's accumulated gradient, observed through one optimizer step.

    With beta1 = beta2 = 0 an AdamW step moves each weight by d = L * g / (|g| + L) when
    lr = eps = L, which inverts to g = d * L / (L - |d|). Returns the directory of the
    adapter as it was before that step, and the gradient per saved tensor.
    """
    scale = 1e4
    before = sampler_dir(data_dir, training.save_weights_for_sampler(f"{name}-before").result().path)
    training.optim_step(types.AdamParams(learning_rate=scale, beta1=0.0, beta2=0.0, eps=scale))
    after = sampler_dir(data_dir, training.save_weights_for_sampler(f"{name}-after").result().path)
    start, end = adapter_tensors(before), adapter_tensors(after)
    steps = {key: (start[key] - end[key]).double() for key in start}
    return before, {key: (step * scale / (scale - step.abs())).float() for key, step in steps.items()}


def peft_gradients(model: PeftModel) -> dict[str, torch.Tensor]:
    """Gradients of a peft model's LoRA weights, keyed as in its saved safetensors file."""
    return {
        name.replace(".default.weight", ".weight"): param.grad
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
