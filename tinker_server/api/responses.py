"""Worker outcomes to proto Results."""

from __future__ import annotations

from tinker_rpc.v1 import sampling_pb2, service_pb2, training_pb2
from tinker_server import ops
from tinker_server.store import CheckpointPath
from tinker_wire.tensor_codec import encode_array


def error_result(code: int, message: str, future_id: str = "", cycle_id: int = 0) -> service_pb2.Result:
    return service_pb2.Result(
        future_id=future_id, cycle_id=cycle_id, error=service_pb2.Error(code=code, message=message)
    )


def outcome_result(outcome: ops.Outcome) -> service_pb2.Result:
    if outcome.error is not None:
        return error_result(outcome.error.code, outcome.error.message, outcome.future_id, outcome.cycle_id)
    result = service_pb2.Result(future_id=outcome.future_id, cycle_id=outcome.cycle_id)
    payload = outcome.result
    match payload:
        case ops.CreateAdapterResult():
            result.create_model.model_id = payload.model_id
        case ops.ForwardBackwardResult():
            result.forward_backward.CopyFrom(_forward_backward(payload))
        case ops.OptimStepResult():
            result.optim_step.metrics.update(payload.metrics)
        case ops.SaveCheckpointResult():
            _saved(result, payload.path)
        case ops.LoadStateResult():
            result.load_state.SetInParent()
        case ops.SampleResult():
            result.sample.CopyFrom(_sample(payload))
        case _:
            raise TypeError(f"unexpected worker result {type(payload).__name__}")
    return result


def _saved(result: service_pb2.Result, path: str) -> None:
    match CheckpointPath.parse(path).checkpoint_type:
        case "sampler":
            result.save_weights_for_sampler.path = path
        case "external":
            result.save_weights_external.path = path
        case _:
            result.save_state.path = path


def _forward_backward(payload: ops.ForwardBackwardResult) -> training_pb2.ForwardBackwardOutput:
    return training_pb2.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord",
        loss_fn_outputs=[
            training_pb2.LossFnOutput(tensors={key: encode_array(value) for key, value in outputs.items()})
            for outputs in payload.loss_fn_outputs
        ],
        metrics=payload.metrics,
    )


def _sample(payload: ops.SampleResult) -> sampling_pb2.SampleResult:
    result = sampling_pb2.SampleResult(
        sequences=[_sequence(sequence) for sequence in payload.sequences],
        prompt_cache_hit_tokens=payload.prompt_cache_hit_tokens,
    )
    prompt = payload.prompt
    if prompt is not None:
        result.prompt_logprobs.CopyFrom(encode_array(prompt.logprobs))
        if prompt.topk_tokens is not None:
            result.topk_prompt_tokens.CopyFrom(encode_array(prompt.topk_tokens))
            result.topk_prompt_logprobs.CopyFrom(encode_array(prompt.topk_logprobs))
    if payload.target_prompt_logprobs is not None:
        result.target_prompt_logprobs.CopyFrom(encode_array(payload.target_prompt_logprobs))
    if payload.prompt_alt_tokens is not None:
        result.prompt_alt_tokens.CopyFrom(encode_array(payload.prompt_alt_tokens))
        result.prompt_alt_logprobs.CopyFrom(encode_array(payload.prompt_alt_logprobs))
    return result


def _sequence(sequence: ops.SequenceArrays) -> sampling_pb2.SampledSequence:
    encoded = sampling_pb2.SampledSequence(
        sequence_id=sequence.sequence_id,
        stop_reason=sampling_pb2.STOP_REASON_STOP if sequence.stopped else sampling_pb2.STOP_REASON_LENGTH,
        tokens=encode_array(sequence.tokens),
        logprobs=encode_array(sequence.logprobs),
        sampling_logprobs=encode_array(sequence.sampling_logprobs),
    )
    if sequence.topk_tokens is not None:
        encoded.topk_tokens.CopyFrom(encode_array(sequence.topk_tokens))
        encoded.topk_logprobs.CopyFrom(encode_array(sequence.topk_logprobs))
    return encoded
