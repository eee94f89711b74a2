"""SDK types to proto messages and back."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tinker_client import types
from tinker_client.tensor_codec import decode_array, encode_array
from tinker_rpc.v1 import sampling_pb2, service_pb2, training_pb2

_INT32 = np.iinfo(np.int32)


def _compact(array: np.ndarray) -> np.ndarray:
    """Integer tensors go as int32 when their values fit: half the bytes on the wire."""
    if array.dtype == np.int64 and (array.size == 0 or (array.min() >= _INT32.min and array.max() <= _INT32.max)):
        return array.astype(np.int32)
    return array


def tokens_to_proto(tokens: np.ndarray | list[int]) -> training_pb2.ModelInput:
    return training_pb2.ModelInput(tokens=encode_array(_compact(np.asarray(tokens, dtype=np.int64))))


def datum_to_proto(datum: types.Datum) -> training_pb2.Datum:
    return training_pb2.Datum(
        model_input=tokens_to_proto(datum.model_input.to_numpy()),
        loss_fn_inputs={key: encode_array(_compact(value.array)) for key, value in datum.loss_fn_inputs.items()},
    )


def forward_backward_input(
    data: list[types.Datum] | list[training_pb2.Datum], loss_fn: str, loss_fn_config: Mapping[str, float] | None
) -> training_pb2.ForwardBackwardInput:
    return training_pb2.ForwardBackwardInput(
        data=[datum if isinstance(datum, training_pb2.Datum) else datum_to_proto(datum) for datum in data],
        loss_fn=loss_fn,
        loss_fn_config=dict(loss_fn_config or {}),
    )


def chunk_data(data: list[types.Datum], max_request_bytes: int) -> list[list[training_pb2.Datum]]:
    """Encodes a batch and splits it so each request stays under the server's message cap."""
    chunks: list[list[training_pb2.Datum]] = [[]]
    size = 0
    for index, datum in enumerate(data):
        message = datum_to_proto(datum)
        datum_bytes = message.ByteSize() + 16  # field tag and length prefix, generously
        if datum_bytes > max_request_bytes:
            raise ValueError(
                f"data[{index}] encodes to {datum_bytes} bytes, more than the server accepts in one "
                f"message ({max_request_bytes}); shorten it or raise the server's --max-message-bytes"
            )
        if chunks[-1] and size + datum_bytes > max_request_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(message)
        size += datum_bytes
    return chunks


def merge_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Combines the metrics of a batch's chunks by their suffix: ':sum', ':max', ':min', else mean."""
    combine = {"sum": sum, "max": max, "min": min}
    keys = dict.fromkeys(key for entry in metrics for key in entry)
    merged = {}
    for key in keys:
        values = [entry[key] for entry in metrics if key in entry]
        reduce = combine.get(key.rpartition(":")[2])
        merged[key] = reduce(values) if reduce else sum(values) / len(values)
    return merged


def forward_backward_outputs(results: list[service_pb2.Result]) -> types.ForwardBackwardOutput:
    """The output of a batch that went out as one request per chunk, in order."""
    outputs = [forward_backward_output(result) for result in results]
    return types.ForwardBackwardOutput(
        loss_fn_output_type=outputs[0].loss_fn_output_type,
        loss_fn_outputs=[entry for output in outputs for entry in output.loss_fn_outputs],
        metrics=merge_metrics([output.metrics for output in outputs]),
    )


def forward_backward_output(result: service_pb2.Result) -> types.ForwardBackwardOutput:
    output = result.forward_backward
    return types.ForwardBackwardOutput(
        loss_fn_output_type=output.loss_fn_output_type,
        loss_fn_outputs=[
            {key: types.TensorData.from_numpy(decode_array(tensor)) for key, tensor in entry.tensors.items()}
            for entry in output.loss_fn_outputs
        ],
        metrics=dict(output.metrics),
    )


def adam_params(params: types.AdamParams) -> training_pb2.AdamParams:
    return training_pb2.AdamParams(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def sampling_params(params: types.SamplingParams) -> sampling_pb2.SamplingParams:
    message = sampling_pb2.SamplingParams(
        max_tokens=params.max_tokens or 0,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
    )
    if params.seed is not None:
        message.seed = params.seed
    stop = params.stop
    if stop is not None:
        # An explicit stop list replaces end-of-sequence stopping; [] disables stopping.
        message.ignore_eos = True
        stops = [stop] if isinstance(stop, str) else list(stop)
        if all(isinstance(item, str) for item in stops):
            message.stop_strings.extend(stops)
        elif all(isinstance(item, int | np.integer) for item in stops):
            message.stop_token_ids.extend(int(item) for item in stops)
        else:
            raise TypeError("SamplingParams.stop: give strings or token ids, not a mix")
    return message


def sample_response(result: service_pb2.Result) -> types.SampleResponse:
    sample = result.sample
    prompt_logprobs = None
    if sample.HasField("prompt_logprobs"):
        values = decode_array(sample.prompt_logprobs)
        prompt_logprobs = [None if np.isnan(value) else float(value) for value in values]
    topk_prompt_logprobs = None
    if sample.HasField("topk_prompt_tokens"):
        tokens, values = decode_array(sample.topk_prompt_tokens), decode_array(sample.topk_prompt_logprobs)
        topk_prompt_logprobs = [None] + [
            list(zip(row_tokens.tolist(), row_values.tolist(), strict=True))
            for row_tokens, row_values in zip(tokens[1:], values[1:], strict=True)
        ]
    return types.SampleResponse(
        sequences=[
            types.SampledSequence(
                stop_reason="stop" if sequence.stop_reason == sampling_pb2.STOP_REASON_STOP else "length",
                tokens=decode_array(sequence.tokens).tolist(),
                logprobs=decode_array(sequence.logprobs).tolist(),
                sampling_logprobs=decode_array(sequence.sampling_logprobs).tolist(),
            )
            for sequence in sample.sequences
        ],
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk_prompt_logprobs,
    )


def lora_config(message: training_pb2.LoraConfig) -> types.LoraConfig:
    return types.LoraConfig(
        rank=message.rank,
        seed=message.seed if message.HasField("seed") else None,
        train_mlp=message.train_mlp,
        train_attn=message.train_attn,
        train_unembed=message.train_unembed,
    )
