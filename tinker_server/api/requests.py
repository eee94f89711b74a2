"""Turns SessionRequests into validated worker operations, or a RequestError naming the field.

Nothing invalid reaches the scheduler: every tensor is decoded and checked for dtype,
shape, range and finiteness here, and every option is either honoured or rejected.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass

import grpc
import numpy as np

from tinker_client.tensor_codec import TensorDecodeError, decode_array
from tinker_rpc.v1 import sampling_pb2, service_pb2, tensor_pb2, training_pb2
from tinker_server import ops
from tinker_server.auth import current_owner
from tinker_server.loss_specs import LOSS_SPECS, LossSpec
from tinker_server.runs import Runs
from tinker_server.served import ServedModel
from tinker_server.store import CheckpointPath, CheckpointType, TrainingRun

LORA_ALPHA = 32.0
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


class RequestError(Exception):
    """A request that is rejected before it is queued."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Limits:
    max_lora_rank: int = 128
    max_num_samples: int = 128
    max_topk_prompt_logprobs: int = 64
    max_batch_tokens: int = 1 << 20
    max_message_bytes: int = 256 << 20
    max_adapters: int = 256
    """Training runs the worker holds at once."""
    max_inflight_requests: int = 512
    """Requests acked but not yet answered, per session stream."""


@dataclass
class ParsedRequest:
    queue_key: str
    item: ops.WorkItem
    run: TrainingRun | None = None
    """A run this request creates; registered when it is queued."""
    checkpoint: CheckpointPath | None = None
    """A checkpoint this request saves; recorded when it succeeds."""
    ttl_seconds: int | None = None


class RequestParser:
    def __init__(self, served: ServedModel, runs: Runs, limits: Limits) -> None:
        self._served = served
        self._runs = runs
        self._limits = limits

    @property
    def _model(self) -> ops.ModelInfo:
        return self._served.info

    def parse(self, request: service_pb2.SessionRequest) -> ParsedRequest:
        kind = request.WhichOneof("request")
        if kind is None:
            raise invalid("request: no operation set (expected one of create_model, forward, ...)")
        if kind == "create_model":
            return self._create_model(request.create_model)
        if kind == "create_model_from_state":
            return self._create_model_from_state(request.create_model_from_state)
        if kind == "sample":
            return self._sample(request.sample)
        model_id = self._existing_model(request.model_id)
        if kind in ("forward", "forward_backward"):
            operation = self._forward_backward(kind, getattr(request, kind), backward=kind == "forward_backward")
        elif kind == "optim_step":
            operation = self._optim_step(request.optim_step)
        elif kind == "load_state":
            operation = self._load_state(request.load_state)
        elif kind == "save_weights_for_sampler":
            save = request.save_weights_for_sampler
            ttl = save.ttl_seconds if save.HasField("ttl_seconds") else None
            return self._save(kind, model_id, "sampler", save.name, ttl, overwrite=False)
        elif kind == "save_state":
            save = request.save_state
            ttl = save.ttl_seconds if save.HasField("ttl_seconds") else None
            return self._save(kind, model_id, "training", save.name, ttl, save.overwrite)
        else:  # a newer client's operation this server does not know
            raise invalid(f"request: unsupported operation {kind!r}")
        return ParsedRequest(model_id, ops.WorkItem("", model_id, operation))

    # -- models ----------------------------------------------------------------------

    def _existing_model(self, model_id: str) -> str:
        if not model_id:
            raise invalid("model_id: required for this operation")
        if self._runs.owned_run(model_id, current_owner.get()) is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"model_id {model_id!r}: no such training run")
        if not self._runs.is_live(model_id):
            saved = self._runs.last_checkpoint(model_id, "training")
            hint = f"its last checkpoint is {saved.path}" if saved else "it has no saved checkpoint"
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model_id {model_id!r}: the server restarted (or its worker crashed) since this run last "
                f"trained and its unsaved state is gone; {hint}: continue with create_training_client_from_state",
            )
        return model_id

    def _check_base_model(self, field: str, name: str) -> None:
        if name != self._model.name:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"{field} {name!r} is not served here; served: [{self._model.name!r}]",
            )

    def _check_capacity(self) -> None:
        if self._runs.live_count() >= self._limits.max_adapters:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds {self._limits.max_adapters} training runs, its limit; try again later",
            )

    def _create_model(self, request: training_pb2.CreateModelRequest) -> ParsedRequest:
        self._check_base_model("create_model.base_model", request.base_model)
        self._check_capacity()
        lora = request.lora_config
        if not 1 <= lora.rank <= self._limits.max_lora_rank:
            raise invalid(
                f"create_model.lora_config.rank: {lora.rank} is out of range [1, {self._limits.max_lora_rank}]"
            )
        if not (lora.train_mlp or lora.train_attn or lora.train_unembed):
            raise invalid("create_model.lora_config: at least one of train_mlp, train_attn, train_unembed must be true")
        seed = lora.seed if lora.HasField("seed") else secrets.randbits(31)
        spec = ops.LoraSpec(lora.rank, seed, lora.train_mlp, lora.train_attn, lora.train_unembed, LORA_ALPHA)
        model_id = new_model_id()
        run = TrainingRun(model_id, "", request.base_model, spec, dict(request.user_metadata))
        return ParsedRequest(model_id, ops.WorkItem("", model_id, ops.CreateAdapter(spec)), run=run)

    def _create_model_from_state(self, request: training_pb2.CreateModelFromStateRequest) -> ParsedRequest:
        self._check_capacity()
        path, source = self._checkpoint_source(
            "create_model_from_state.path", request.path, training_only=request.with_optimizer
        )
        model_id = new_model_id()
        run = TrainingRun(model_id, "", source.base_model, source.lora, dict(request.user_metadata))
        operation = ops.CreateAdapter(source.lora, str(self._runs.directory(path)), request.with_optimizer)
        return ParsedRequest(model_id, ops.WorkItem("", model_id, operation), run=run)

    def _checkpoint_source(self, field: str, text: str, training_only: bool) -> tuple[CheckpointPath, TrainingRun]:
        """A saved checkpoint to load from, and the run that saved it."""
        try:
            path = CheckpointPath.parse(text)
        except ValueError as error:
            raise invalid(f"{field}: {error}") from error
        source = self._runs.owned_run(path.model_id, current_owner.get())
        if source is None or self._runs.checkpoint(path) is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{field}: no checkpoint {text}")
        if training_only and path.checkpoint_type != "training":
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{field}: {text} holds no optimizer state; use a tinker://<run>/weights/<name> checkpoint",
            )
        return path, source

    def _load_state(self, request: training_pb2.LoadStateRequest) -> ops.LoadState:
        path, _ = self._checkpoint_source("load_state.path", request.path, training_only=request.with_optimizer)
        return ops.LoadState(str(self._runs.directory(path)), request.with_optimizer)

    # -- forward / backward ----------------------------------------------------------

    def _forward_backward(
        self, kind: str, request: training_pb2.ForwardBackwardInput, backward: bool
    ) -> ops.ForwardBackward:
        spec = LOSS_SPECS.get(request.loss_fn)
        if spec is None:
            raise invalid(f"{kind}.loss_fn: unknown loss {request.loss_fn!r}; expected one of {sorted(LOSS_SPECS)}")
        config = self._loss_config(kind, spec, dict(request.loss_fn_config))
        if not request.data:
            raise invalid(f"{kind}.data: empty batch; send at least one datum")
        data = [self._datum(f"{kind}.data[{index}]", spec, datum) for index, datum in enumerate(request.data)]
        total_tokens = sum(len(datum.tokens) for datum in data)
        if total_tokens > self._limits.max_batch_tokens:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{kind}.data: {total_tokens} tokens exceed the per-request limit of {self._limits.max_batch_tokens}",
            )
        return ops.ForwardBackward(data, spec.name, config, backward)

    @staticmethod
    def _loss_config(kind: str, spec: LossSpec, given: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(given) - set(spec.config_defaults))
        if unknown:
            raise invalid(
                f"{kind}.loss_fn_config: unknown key(s) {unknown} for {spec.name}; "
                f"accepted: {sorted(spec.config_defaults)}"
            )
        for key, value in given.items():
            if not math.isfinite(value):
                raise invalid(f"{kind}.loss_fn_config[{key!r}]: {value} is not finite")
        return {**spec.config_defaults, **given}

    def _tokens(self, field: str, tensor: tensor_pb2.TensorData, max_length: int) -> np.ndarray:
        tokens = self._decode(field, tensor)
        if tokens.dtype.kind != "i":
            raise invalid(f"{field}: dtype {tokens.dtype.name} is not an integer type; send int32 or int64")
        if tokens.ndim != 1 or not 1 <= len(tokens) <= max_length:
            raise invalid(f"{field}: shape {list(tokens.shape)}; expected [N] with 1 <= N <= {max_length}")
        self._check_token_range(field, tokens)
        return tokens.astype(np.int64)

    def _check_token_range(self, field: str, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self._model.vocab_size):
            bad = int(tokens[(tokens < 0) | (tokens >= self._model.vocab_size)][0])
            raise invalid(f"{field}: token id {bad} is out of range [0, {self._model.vocab_size})")

    @staticmethod
    def _decode(field: str, tensor: tensor_pb2.TensorData) -> np.ndarray:
        try:
            return decode_array(tensor)
        except TensorDecodeError as error:
            raise invalid(f"{field}: {error}") from error

    def _datum(self, field: str, spec: LossSpec, datum: training_pb2.Datum) -> ops.DatumArrays:
        tokens = self._tokens(f"{field}.model_input.tokens", datum.model_input.tokens, self._model.max_context_length)
        given = set(datum.loss_fn_inputs)
        expected = spec.all_inputs()
        if unknown := sorted(given - set(expected)):
            raise invalid(
                f"{field}.loss_fn_inputs: unknown key(s) {unknown} for {spec.name}; accepted: {sorted(expected)}"
            )
        if missing := sorted(set(spec.required_inputs) - given):
            raise invalid(f"{field}.loss_fn_inputs: missing key(s) {missing} required by {spec.name}")
        inputs: dict[str, np.ndarray] = {}
        for key in sorted(given):
            key_field = f"{field}.loss_fn_inputs[{key!r}]"
            array = self._decode(key_field, datum.loss_fn_inputs[key])
            inputs[key] = self._loss_input(key_field, expected[key], array, len(tokens))
        self._check_shapes_agree(field, inputs)
        return ops.DatumArrays(tokens, inputs)

    def _loss_input(self, field: str, kind: str, array: np.ndarray, length: int) -> np.ndarray:
        if kind == "int":
            if array.dtype.kind != "i":
                raise invalid(f"{field}: dtype {array.dtype.name}; expected int32 or int64")
            self._check_token_range(field, array)
            array = array.astype(np.int64)
        else:
            if array.dtype != np.float32:
                raise invalid(f"{field}: dtype {array.dtype.name}; expected float32")
            if not np.isfinite(array).all():
                raise invalid(f"{field}: contains NaN or infinity")
        if array.ndim not in (1, 2) or array.shape[0] != length:
            raise invalid(
                f"{field}: shape {list(array.shape)} disagrees with model_input length {length}; "
                f"expected [{length}] (or [{length}, K] for top-K targets)"
            )
        return array

    @staticmethod
    def _check_shapes_agree(field: str, inputs: dict[str, np.ndarray]) -> None:
        """Per-token inputs are [N]; only cross_entropy's targets and weights may be [N, K]."""
        target_shape = inputs["target_tokens"].shape
        for key, array in inputs.items():
            if array.ndim == 2 and key not in ("target_tokens", "weights"):
                raise invalid(f"{field}.loss_fn_inputs[{key!r}]: shape {list(array.shape)}; expected [N]")
            if key == "weights" and array.shape != target_shape:
                raise invalid(
                    f"{field}.loss_fn_inputs['weights']: shape {list(array.shape)} "
                    f"differs from target_tokens' {list(target_shape)}"
                )
        if len(target_shape) == 2 and set(inputs) - {"target_tokens", "weights"}:
            raise invalid(f"{field}.loss_fn_inputs['target_tokens']: the [N, K] form is for cross_entropy only")

    # -- optimizer -------------------------------------------------------------------

    @staticmethod
    def _optim_step(request: training_pb2.OptimStepRequest) -> ops.OptimStep:
        if not request.HasField("adam_params"):
            raise invalid("optim_step.adam_params: required")
        adam = request.adam_params
        checks = [
            ("learning_rate", adam.learning_rate, adam.learning_rate >= 0, ">= 0"),
            ("beta1", adam.beta1, 0 <= adam.beta1 < 1, "in [0, 1)"),
            ("beta2", adam.beta2, 0 <= adam.beta2 < 1, "in [0, 1)"),
            ("eps", adam.eps, adam.eps > 0, "> 0"),
            ("weight_decay", adam.weight_decay, adam.weight_decay >= 0, ">= 0"),
            ("grad_clip_norm", adam.grad_clip_norm, adam.grad_clip_norm >= 0, ">= 0 (0 disables clipping)"),
        ]
        for name, value, ok, valid in checks:
            if not (math.isfinite(value) and ok):
                raise invalid(f"optim_step.adam_params.{name}: {value}; must be finite and {valid}")
        return ops.OptimStep(
            ops.AdamConfig(adam.learning_rate, adam.beta1, adam.beta2, adam.eps, adam.weight_decay, adam.grad_clip_norm)
        )

    # -- sampler snapshots and sampling ----------------------------------------------

    def _save(
        self, kind: str, model_id: str, checkpoint_type: CheckpointType, name: str, ttl: int | None, overwrite: bool
    ) -> ParsedRequest:
        if not _NAME_PATTERN.match(name):
            raise invalid(f"{kind}.name: {name!r}; use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")
        if ttl is not None and ttl < 1:
            raise invalid(f"{kind}.ttl_seconds: {ttl}; must be >= 1 (leave it unset to keep the checkpoint)")
        path = CheckpointPath(model_id, checkpoint_type, name)
        if not overwrite and self._runs.checkpoint_exists(path):
            hint = "; pass overwrite=True to replace it" if kind == "save_state" else ""
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"{kind}.name: {path} already exists{hint}")
        directory = str(self._runs.directory(path))
        if checkpoint_type == "training":
            operation: ops.Operation = ops.SaveState(str(path), directory)
        else:
            operation = ops.SaveForSampler(str(path), directory)
        return ParsedRequest(model_id, ops.WorkItem("", model_id, operation), checkpoint=path, ttl_seconds=ttl)

    def _sample(self, request: sampling_pb2.SampleRequest) -> ParsedRequest:
        source = request.WhichOneof("weights")
        if source is None:
            raise invalid("sample: set one of model_path or base_model")
        if source == "base_model":
            self._check_base_model("sample.base_model", request.base_model)
            adapter = adapter_dir = None
        else:
            path, _ = self._checkpoint_source("sample.model_path", request.model_path, training_only=False)
            adapter, adapter_dir = str(path), str(self._runs.directory(path))
        prompt = self._tokens("sample.prompt.tokens", request.prompt.tokens, self._model.max_context_length)
        if not 1 <= request.num_samples <= self._limits.max_num_samples:
            raise invalid(f"sample.num_samples: {request.num_samples}; expected 1..{self._limits.max_num_samples}")
        params = self._sampling_params(request.sampling_params, len(prompt))
        if not 0 <= request.topk_prompt_logprobs <= self._limits.max_topk_prompt_logprobs:
            raise invalid(
                f"sample.topk_prompt_logprobs: {request.topk_prompt_logprobs}; "
                f"expected 0..{self._limits.max_topk_prompt_logprobs}"
            )
        operation = ops.Sample(
            adapter,
            adapter_dir,
            prompt,
            request.num_samples,
            params,
            request.include_prompt_logprobs,
            min(request.topk_prompt_logprobs, self._model.vocab_size),
        )
        return ParsedRequest(f"sampler:{source}:{adapter or request.base_model}", ops.WorkItem("", "", operation))

    def _sampling_params(self, params: sampling_pb2.SamplingParams, prompt_length: int) -> ops.SamplingConfig:
        room = self._model.max_context_length - prompt_length
        max_tokens = params.max_tokens or room
        if not 1 <= max_tokens <= room:
            raise invalid(
                f"sample.sampling_params.max_tokens: {params.max_tokens}; expected 1..{room} "
                f"(context {self._model.max_context_length} minus prompt {prompt_length})"
            )
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise invalid(f"sample.sampling_params.temperature: {params.temperature}; must be >= 0 (0 = greedy)")
        if not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
            raise invalid(f"sample.sampling_params.top_p: {params.top_p}; must be in (0, 1]")
        stop_ids = np.asarray(params.stop_token_ids, dtype=np.int64)
        self._check_token_range("sample.sampling_params.stop_token_ids", stop_ids)
        if any(not stop for stop in params.stop_strings):
            raise invalid("sample.sampling_params.stop_strings: empty string")
        return ops.SamplingConfig(
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed if params.HasField("seed") else None,
            stop_strings=tuple(params.stop_strings),
            stop_token_ids=tuple(int(token) for token in stop_ids),
            ignore_eos=params.ignore_eos,
        )


def new_model_id() -> str:
    return f"run-{secrets.token_hex(8)}"
