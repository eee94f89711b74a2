"""SDK types to proto messages and back."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np

from tinker_client import types
from tinker_client.types._coerce import token_array
from tinker_rpc.v1 import runs_pb2, sampling_pb2, service_pb2, tensor_pb2, training_pb2
from tinker_wire.tensor_codec import decode_array, encode_array

_INT32 = np.iinfo(np.int32)
_SPAN_SOURCES = {
    types.PromptProvenanceSpan: training_pb2.PROVENANCE_SOURCE_PROMPT,
    types.SampledProvenanceSpan: training_pb2.PROVENANCE_SOURCE_SAMPLED,
}
_CHECKPOINT_TYPES: dict[int, types.CheckpointType] = {
    runs_pb2.CHECKPOINT_TYPE_TRAINING: "training",
    runs_pb2.CHECKPOINT_TYPE_SAMPLER: "sampler",
    runs_pb2.CHECKPOINT_TYPE_EXTERNAL: "external",
}

# -- requests ------------------------------------------------------------------------


def _compact(array: np.ndarray) -> np.ndarray:
    """Integer tensors go as int32 when their values fit: half the bytes on the wire."""
    if array.dtype == np.int64 and (array.size == 0 or (array.min() >= _INT32.min and array.max() <= _INT32.max)):
        return array.astype(np.int32)
    return array


def tensor(data: types.TensorData, pad_value: int = 0) -> tensor_pb2.TensorData:
    """Dense on the wire (a sparse tensor is densified with `pad_value`)."""
    return encode_array(_compact(data.dense(pad_value)))


def tokens_to_proto(tokens: np.ndarray | list[int]) -> training_pb2.ModelInput:
    return training_pb2.ModelInput(tokens=encode_array(_compact(np.asarray(tokens, dtype=np.int64))))


def _chunk(chunk: types.ModelInputChunk) -> training_pb2.ModelInputChunk:
    match chunk:
        case types.EncodedTextChunk():
            tokens = token_array(chunk.tokens, "EncodedTextChunk.tokens")
            return training_pb2.ModelInputChunk(tokens=encode_array(_compact(tokens)))
        case types.ImageChunk():
            image = training_pb2.ImageChunk(data=chunk.data, format=chunk.format, expected_tokens=chunk.expected_tokens)
            return training_pb2.ModelInputChunk(image=image)
        case types.ImageAssetPointerChunk():
            pointer = training_pb2.ImageAssetPointerChunk(
                location=chunk.location, format=chunk.format, expected_tokens=chunk.expected_tokens
            )
            return training_pb2.ModelInputChunk(image_asset_pointer=pointer)
    raise TypeError(f"{type(chunk).__name__}: this SDK cannot send such a chunk (audio input is not supported)")


def model_input(value: types.ModelInput) -> training_pb2.ModelInput:
    """Text goes as one tensor; input with other chunks goes chunk by chunk."""
    if value.is_text:
        return tokens_to_proto(value.to_numpy())
    return training_pb2.ModelInput(chunks=[_chunk(chunk) for chunk in value.chunks])


def _spans(spans: types.ProvenanceSpans) -> list[training_pb2.ProvenanceSpan]:
    return [
        training_pb2.ProvenanceSpan(
            source=_SPAN_SOURCES[type(span)], sequence_id=span.sequence_id, offset=span.offset, length=span.length
        )
        for span in spans
    ]


def datum_to_proto(datum: types.Datum) -> training_pb2.Datum:
    message = training_pb2.Datum(
        model_input=model_input(datum.model_input),
        loss_fn_inputs={key: tensor(value) for key, value in datum.loss_fn_inputs.items()},
    )
    if datum.model_input_spans is not None and datum.loss_fn_input_spans is not None:
        message.model_input_spans.extend(_spans(datum.model_input_spans))
        message.loss_fn_input_spans.extend(_spans(datum.loss_fn_input_spans))
    return message


def forward_backward_input(
    data: list[types.Datum] | list[training_pb2.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None
) -> training_pb2.ForwardBackwardInput:
    config = dict(loss_fn_config or {})
    return training_pb2.ForwardBackwardInput(
        data=[datum if isinstance(datum, training_pb2.Datum) else datum_to_proto(datum) for datum in data],
        loss_fn=loss_fn,
        loss_fn_config={key: float(value) for key, value in config.items() if not isinstance(value, str)},
        loss_fn_config_strings={key: value for key, value in config.items() if isinstance(value, str)},
    )


def chunk_data(
    data: list[types.Datum], max_request_bytes: int, max_tokens: float = math.inf
) -> list[list[training_pb2.Datum]]:
    """Encodes a batch and splits it so each request stays under the server's message cap and
    its tokens per request (max_batch_tokens)."""
    chunks: list[list[training_pb2.Datum]] = [[]]
    size = tokens = 0
    for index, datum in enumerate(data):
        message = datum_to_proto(datum)
        datum_bytes = message.ByteSize() + 16  # field tag and length prefix, generously
        datum_tokens = datum.model_input.length
        if datum_bytes > max_request_bytes:
            raise ValueError(
                f"data[{index}] encodes to {datum_bytes} bytes, more than the server accepts in one "
                f"message ({max_request_bytes}); shorten it or raise the server's --max-message-bytes"
            )
        if datum_tokens > max_tokens:
            raise ValueError(
                f"data[{index}] has {datum_tokens} tokens, more than the server accepts in one request "
                f"({max_tokens}); shorten it or raise the server's --max-batch-tokens"
            )
        if chunks[-1] and (size + datum_bytes > max_request_bytes or tokens + datum_tokens > max_tokens):
            chunks.append([])
            size = tokens = 0
        chunks[-1].append(message)
        size += datum_bytes
        tokens += datum_tokens
    return chunks


def targets_only(data: list[types.Datum]) -> list[types.Datum]:
    """The datums as a plain forward needs them: a custom loss's extra inputs stay here."""
    return [
        types.Datum(
            model_input=datum.model_input, loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"]}
        )
        for datum in data
    ]


def adam_params(params: types.AdamParams) -> training_pb2.AdamParams:
    return training_pb2.AdamParams(
        learning_rate=params.learning_rate,
        beta1=params.beta1,
        beta2=params.beta2,
        eps=params.eps,
        weight_decay=params.weight_decay,
        grad_clip_norm=params.grad_clip_norm,
    )


def optimizer_config(config: types.OptimizerConfig | None) -> training_pb2.OptimizerConfig:
    if config is None:
        return training_pb2.OptimizerConfig(type="adamw")
    return training_pb2.OptimizerConfig(type=config.type, version=getattr(config, "version", 0))


def sampling_params(params: types.SamplingParams) -> sampling_pb2.SamplingParams:
    message = sampling_pb2.SamplingParams(
        max_tokens=params.max_tokens or 0,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
    )
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


# -- results -------------------------------------------------------------------------


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


def forward_backward_output(result: service_pb2.Result) -> types.ForwardBackwardOutput:
    output = result.forward_backward
    return types.ForwardBackwardOutput(
        loss_fn_output_type=output.loss_fn_output_type,
        loss_fn_outputs=[
            {key: types.TensorData.from_numpy(decode_array(value)) for key, value in entry.tensors.items()}
            for entry in output.loss_fn_outputs
        ],
        metrics=dict(output.metrics),
    )


def forward_backward_outputs(results: list[service_pb2.Result]) -> types.ForwardBackwardOutput:
    """The output of a batch that went out as one request per chunk, in order."""
    outputs = [forward_backward_output(result) for result in results]
    return types.ForwardBackwardOutput(
        loss_fn_output_type=outputs[0].loss_fn_output_type,
        loss_fn_outputs=[entry for output in outputs for entry in output.loss_fn_outputs],
        metrics=merge_metrics([output.metrics for output in outputs]),
    )


def custom_output(
    backward: types.ForwardBackwardOutput, loss: float, metrics: dict[str, float]
) -> types.ForwardBackwardOutput:
    outputs = [{"logprobs": output["logprobs"]} for output in backward.loss_fn_outputs]
    return types.ForwardBackwardOutput("custom", outputs, {**metrics, "loss:sum": loss})


def _optional(message: sampling_pb2.SampleResult | sampling_pb2.SampledSequence, field: str) -> np.ndarray | None:
    return _owned(getattr(message, field)) if message.HasField(field) else None


def _owned(tensor: tensor_pb2.TensorData) -> np.ndarray:
    """The caller's own writable array, as Tinker's are (a decoded view is read-only, and keeps the
    whole response's bytes alive)."""
    return decode_array(tensor).copy()


def _topk(tokens: np.ndarray | None, logprobs: np.ndarray | None) -> types.TopkLogprobs | None:
    """The server marks unscored slots with id -1 (and NaN); the SDK's sentinel is (0, MASK)."""
    if tokens is None or logprobs is None:
        return None
    empty = tokens < 0
    return types.TopkLogprobs(
        token_ids=np.where(empty, 0, tokens).astype(np.int32),
        logprobs=np.where(empty, types.sampling.MASK_LOGPROB, logprobs).astype(np.float32),
    )


def _sequence(sequence: sampling_pb2.SampledSequence) -> types.SampledSequence:
    return types.SampledSequence(
        stop_reason="stop" if sequence.stop_reason == sampling_pb2.STOP_REASON_STOP else "length",
        sequence_id=sequence.sequence_id,
        tokens_np=_owned(sequence.tokens),
        logprobs_np=_owned(sequence.logprobs),
        topk_logprobs_np=_topk(_optional(sequence, "topk_tokens"), _optional(sequence, "topk_logprobs")),
        sampling_logprobs_np=_owned(sequence.sampling_logprobs),
    )


def sample_response(result: service_pb2.Result) -> types.SampleResponse:
    sample = result.sample
    target = _optional(sample, "target_prompt_logprobs")
    alt_tokens, alt_logprobs = _optional(sample, "prompt_alt_tokens"), _optional(sample, "prompt_alt_logprobs")
    return types.SampleResponse(
        sequences=[_sequence(sequence) for sequence in sample.sequences],
        prompt_logprobs_np=_optional(sample, "prompt_logprobs"),
        topk_prompt_logprobs_np=_topk(
            _optional(sample, "topk_prompt_tokens"), _optional(sample, "topk_prompt_logprobs")
        ),
        target_prompt_logprobs=None if target is None else types.TensorData.from_numpy(target),
        prompt_cache_hit_tokens=sample.prompt_cache_hit_tokens,
        prompt_alt_tokens=(
            None
            if alt_tokens is None or alt_logprobs is None
            else types.PromptAltTokens(
                types.TensorData.from_numpy(alt_tokens.astype(np.int64)), types.TensorData.from_numpy(alt_logprobs)
            )
        ),
    )


def capabilities(response: service_pb2.GetServerCapabilitiesResponse) -> types.GetServerCapabilitiesResponse:
    return types.GetServerCapabilitiesResponse(
        supported_models=[
            types.SupportedModel(
                model_name=model.model_name,
                max_context_length=model.max_context_length,
                trainable=model.trainable,
                sampleable=model.sampleable,
                vocab_size=model.vocab_size,
            )
            for model in response.supported_models
        ],
        max_lora_rank=response.max_lora_rank,
        max_message_bytes=response.max_message_bytes,
        max_adapters=response.max_adapters,
        max_inflight_requests=response.max_inflight_requests,
        max_batch_tokens=response.max_batch_tokens,
        max_num_samples=response.max_num_samples,
        residency=types.AdapterResidency(
            **{
                field.name: getattr(response.residency, field.name)
                for field in dataclasses.fields(types.AdapterResidency)
            }
        ),
    )


def lora_config(message: training_pb2.LoraConfig) -> types.LoraConfig:
    return types.LoraConfig(
        rank=message.rank,
        seed=message.seed if message.HasField("seed") else None,
        train_mlp=message.train_mlp,
        train_attn=message.train_attn,
        train_unembed=message.train_unembed,
    )


def _optimizer(type_name: str) -> types.OptimizerConfig:
    return types.DimuonOptimizerConfig() if type_name == "dimuon" else types.AdamOptimizerConfig()


def info(response: service_pb2.GetInfoResponse) -> types.GetInfoResponse:
    return types.GetInfoResponse(
        model_id=response.model_id,
        model_data=types.ModelData(
            arch=response.arch, model_name=response.model_name, tokenizer_id=response.tokenizer_id
        ),
        optimizer_config=_optimizer(response.optimizer.type),
        is_lora=response.is_lora,
        lora_rank=response.lora_rank,
        model_name=response.model_name,
        lora_config=lora_config(response.lora_config),
        lora_alpha=response.lora_alpha,
        trained_modules=list(response.trained_modules),
    )


def external_weights_urls(message: runs_pb2.GetExternalWeightsUrlsResponse) -> types.ExternalWeightsUrlsResponse:
    return types.ExternalWeightsUrlsResponse(dict(message.urls), _time(message.expires))


def _time(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def checkpoint(message: runs_pb2.Checkpoint) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=message.checkpoint_id,
        checkpoint_type=_CHECKPOINT_TYPES[message.checkpoint_type],
        time=_time(message.time),
        tinker_path=message.tinker_path,
        size_bytes=message.size_bytes,
        public=message.public,
        user_metadata=dict(message.user_metadata),
        expires_at=_time(message.expires_at) if message.HasField("expires_at") else None,
    )


def training_run(message: runs_pb2.TrainingRun) -> types.TrainingRun:
    return types.TrainingRun(
        training_run_id=message.training_run_id,
        base_model=message.base_model,
        model_owner=message.model_owner,
        is_lora=message.is_lora,
        last_request_time=_time(message.last_request_time),
        corrupted=message.corrupted,
        lora_rank=message.lora_rank,
        last_checkpoint=checkpoint(message.last_checkpoint) if message.HasField("last_checkpoint") else None,
        last_sampler_checkpoint=(
            checkpoint(message.last_sampler_checkpoint) if message.HasField("last_sampler_checkpoint") else None
        ),
        user_metadata=dict(message.user_metadata),
        size_bytes=message.size_bytes,
        session_id=message.session_id or None,
        project_id=message.project_id or None,
    )


def runs_page(response: runs_pb2.ListTrainingRunsResponse, limit: int, offset: int) -> types.TrainingRunsResponse:
    return types.TrainingRunsResponse(
        training_runs=[training_run(run) for run in response.training_runs],
        cursor=types.Cursor(offset=offset, limit=limit, total_count=response.total_count),
    )


def checkpoints_page(
    response: runs_pb2.ListUserCheckpointsResponse, limit: int, offset: int
) -> types.CheckpointsListResponse:
    return types.CheckpointsListResponse(
        checkpoints=[checkpoint(message) for message in response.checkpoints],
        cursor=types.Cursor(offset=offset, limit=limit, total_count=response.total_count),
    )


def weights_info(response: runs_pb2.GetWeightsInfoResponse) -> types.WeightsInfoResponse:
    return types.WeightsInfoResponse(
        base_model=response.base_model,
        is_lora=response.is_lora,
        optimizer_config=_optimizer(response.optimizer_type),
        lora_rank=response.lora.rank,
        train_unembed=response.lora.train_unembed,
        train_mlp=response.lora.train_mlp,
        train_attn=response.lora.train_attn,
    )


def session(response: runs_pb2.GetSessionResponse) -> types.GetSessionResponse:
    return types.GetSessionResponse(
        training_run_ids=list(response.training_run_ids),
        sampler_ids=list(response.sampler_ids),
        user_metadata=dict(response.user_metadata),
        display_name=response.display_name or None,
    )


def sampler(response: runs_pb2.GetSamplerResponse) -> types.GetSamplerResponse:
    return types.GetSamplerResponse(response.sampler_id, response.base_model, response.model_path or None)


def whoami(response: runs_pb2.WhoamiResponse) -> types.WhoamiResponse:
    return types.WhoamiResponse(user_urn=f"urn:tinker-grpc:owner:{response.owner}", org_urn="urn:tinker-grpc:server")
