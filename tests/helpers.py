"""Test helpers: raw protocol sessions, example data, and plain-torch references."""

from __future__ import annotations

import itertools
import queue
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tinker_client import types
from tinker_rpc.v1 import sampling_pb2, service_pb2, service_pb2_grpc, training_pb2
from tinker_server.worker.models import EMBEDDED_MODEL_NAME, build_embedded_model
from tinker_wire.tensor_codec import decode_array, encode_array


class RawSession:
    """A Session stream driven message by message, to check the protocol itself."""

    def __init__(self, address: str, api_key: str | None = None, batches: bool = False) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = service_pb2_grpc.TinkerServiceStub(self.channel)
        self._requests: queue.Queue[service_pb2.SessionRequest | None] = queue.Queue()
        metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        metadata += (("tinker-session-batches", "1"),) if batches else ()
        self._responses = self.stub.Session(iter(self._requests.get, None), metadata=metadata)
        self._request_ids = itertools.count()

    def send(self, request: service_pb2.SessionRequest) -> None:
        self._requests.put(request)

    def receive(self) -> service_pb2.SessionResponse:
        return next(self._responses)

    def call(self, **operation: Any) -> service_pb2.Result:
        """Sends one request (SessionRequest fields, a fresh request_id) and returns its result, past its ack."""
        self.send(service_pb2.SessionRequest(request_id=f"call-{next(self._request_ids)}", **operation))
        response = self.receive()
        while response.HasField("ack"):
            response = self.receive()
        return response.result

    def close(self) -> None:
        self._requests.put(None)
        self.channel.close()


def create_run(session: RawSession, seed: int = 0) -> str:
    """A rank-4 LoRA run on the embedded model; its model_id."""
    lora = training_pb2.LoraConfig(rank=4, seed=seed, train_mlp=True, train_attn=True, train_unembed=True)
    result = session.call(
        create_model=training_pb2.CreateModelRequest(base_model=EMBEDDED_MODEL_NAME, lora_config=lora)
    )
    assert not result.HasField("error"), result.error.message
    return result.create_model.model_id


def record_sample(session: RawSession, prompt: list[int], num_samples: int, seed: int) -> sampling_pb2.SampleResult:
    """Sequences of the bare base model, sampled at temperature 1 with record_stability_info."""
    params = sampling_pb2.SamplingParams(max_tokens=6, temperature=1.0, top_p=1.0, seed=seed)
    request = sampling_pb2.SampleRequest(
        base_model=EMBEDDED_MODEL_NAME,
        prompt=training_pb2.ModelInput(tokens=encode_array(np.array(prompt, dtype=np.int64))),
        num_samples=num_samples,
        sampling_params=params,
        record_stability_info=True,
    )
    result = session.call(sample=request)
    assert not result.HasField("error"), result.error.message
    return result.sample


def provenance_datum(
    prompt: list[int], sequence: sampling_pb2.SampledSequence, **loss_inputs: np.ndarray
) -> training_pb2.Datum:
    """A datum as the tinker-cookbook's rl_loop builds one from a sampled sequence: input
    prompt + sampled[:-1], targets 0 under the prompt then the sampled tokens, with spans
    naming the sequence's prompt and sampled tokens."""
    sampled = decode_array(sequence.tokens).tolist()
    sequence_id = sequence.sequence_id

    def span(source: int, offset: int, length: int) -> training_pb2.ProvenanceSpan:
        return training_pb2.ProvenanceSpan(source=source, sequence_id=sequence_id, offset=offset, length=length)

    prompt_source, sampled_source = training_pb2.PROVENANCE_SOURCE_PROMPT, training_pb2.PROVENANCE_SOURCE_SAMPLED
    targets = [0] * (len(prompt) - 1) + sampled
    return training_pb2.Datum(
        model_input=training_pb2.ModelInput(tokens=encode_array(np.array(prompt + sampled[:-1], dtype=np.int64))),
        loss_fn_inputs={
            "target_tokens": encode_array(np.array(targets, dtype=np.int64)),
            **{key: encode_array(value) for key, value in loss_inputs.items()},
        },
        model_input_spans=[span(prompt_source, 0, len(prompt)), span(sampled_source, 0, len(sampled) - 1)],
        loss_fn_input_spans=[span(prompt_source, 1, len(prompt) - 1), span(sampled_source, 0, len(sampled))],
    )


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
    before = sampler_dir(data_dir, training.save_weights_for_sampler(f"{name}-before").result().path)
    training.optim_step(types.AdamParams(learning_rate=_PROBE_STEP, beta1=0.0, beta2=0.0, eps=_PROBE_STEP))
    after = sampler_dir(data_dir, training.save_weights_for_sampler(f"{name}-after").result().path)
    return before, _gradients_from_step(before, after)


def read_gradients_raw(
    session: RawSession, model_id: str, data_dir: Path, name: str
) -> tuple[Path, dict[str, torch.Tensor]]:
    """read_gradients over the raw protocol."""

    def save(suffix: str) -> Path:
        request = training_pb2.SaveWeightsForSamplerRequest(name=f"{name}-{suffix}")
        result = session.call(model_id=model_id, save_weights_for_sampler=request)
        return sampler_dir(data_dir, result.save_weights_for_sampler.path)

    before = save("before")
    adam = training_pb2.AdamParams(learning_rate=_PROBE_STEP, beta1=0.0, beta2=0.0, eps=_PROBE_STEP)
    session.call(model_id=model_id, optim_step=training_pb2.OptimStepRequest(adam_params=adam))
    return before, _gradients_from_step(before, save("after"))


_PROBE_STEP = 1e4
"""lr = eps of read_gradients' optimizer step."""


def _gradients_from_step(before: Path, after: Path) -> dict[str, torch.Tensor]:
    start, end = adapter_tensors(before), adapter_tensors(after)
    steps = {key: (start[key] - end[key]).double() for key in start}
    return {key: (step * _PROBE_STEP / (_PROBE_STEP - step.abs())).float() for key, step in steps.items()}


def peft_gradients(model: PeftModel) -> dict[str, torch.Tensor]:
    """Gradients of a peft model's LoRA weights, keyed as in its saved safetensors file."""
    return {
        name.replace(".default.weight", ".weight"): param.grad
        for name, param in model.named_parameters()
        if param.requires_grad and param.grad is not None
    }
