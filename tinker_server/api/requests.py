"""Turns SessionRequests into validated worker operations, or a RequestError naming the field.

Nothing invalid reaches the scheduler: every tensor is decoded and checked for dtype,
shape, range and finiteness here, and every option is either honoured or rejected.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass

import grpc
import numpy as np

from tinker_rpc.v1 import sampling_pb2, service_pb2, tensor_pb2, training_pb2
from tinker_server import ops
from tinker_server.age_encryption import parse_recipients
from tinker_server.api.provenance import DatumProvenance, SpanChecker, SpanError
from tinker_server.auth import current_owner
from tinker_server.loss_specs import LOSS_SPECS, LossSpec
from tinker_server.runs import Runs
from tinker_server.served import ServedModels
from tinker_server.store import (
    CheckpointPath,
    CheckpointType,
    RestorePoint,
    Session,
    TrainingRun,
    inflight_run,
    initial_path,
    is_safe_name,
)
from tinker_wire.tensor_codec import TensorDecodeError, decode_array

LORA_ALPHA = 32.0
CONFIG_FILE = "adapter_config.json"
IMPORT_FILES = {CONFIG_FILE, "adapter_model.safetensors"}


class RequestError(Exception):
    """A request that is rejected before it is queued."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def sampler_queue_prefix(weights: str) -> str:
    return f"sampler:{weights}:"


def sampler_queue(weights: str, owner: str) -> str:
    """The queue of one owner's samples of `weights` (a tinker:// path or a base model): owners
    never share one, so each gets its turns and its own seq."""
    return f"{sampler_queue_prefix(weights)}{owner}"


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
"""A century: any longer and an expiry date is past what clients can represent (year 9999)."""


def check_ttl(field: str, ttl: int | None) -> None:
    """A checkpoint's time to live: unset (kept until deleted), or 1 second to MAX_TTL_SECONDS."""
    if ttl is not None and not 1 <= ttl <= MAX_TTL_SECONDS:
        raise invalid(
            f"{field}: {ttl}; must be from 1 to {MAX_TTL_SECONDS} (a century), or unset to keep the checkpoint"
        )


@dataclass(frozen=True)
class Limits:
    max_lora_rank: int = 128
    max_num_samples: int = 128
    max_topk_prompt_logprobs: int = 64
    max_batch_tokens: int = 1 << 20
    max_message_bytes: int = 256 << 20
    max_adapters: int = 256
    """Training runs resident on the worker's device at once (others wait in host memory or on disk)."""
    max_runs_per_owner: int = 64
    """Live training runs one owner may have."""
    ephemeral_ttl_seconds: float = 3600.0
    """How long an unnamed sampler snapshot lives, unless a newer one of its run replaces it sooner."""
    max_recorded_sequences_per_owner: int = 1_000_000
    """Sampled sequences kept for provenance per owner; the least recently used expire beyond it."""
    max_inflight_requests: int = 512
    """Requests acked but not yet answered, per session stream."""
    max_queued_requests_per_owner: int = 4096
    """Requests acked but not yet answered, per owner, all streams together."""
    max_queued_bytes_per_owner: int = 2 << 30
    """Bytes of those requests, per owner."""
    max_stored_results_per_owner: int = 1_000_000
    """Results kept for resuming (for --result-retention-seconds) per owner; new requests wait beyond it."""
    max_checkpoint_bytes_per_owner: int = 1 << 40
    """Bytes of saved checkpoints one owner may keep; saves beyond it are refused."""
    max_metric_steps_per_run: int = 10_000
    """Steps whose loss and optimizer metrics the console shows, per run; older ones are forgotten."""


@dataclass(frozen=True)
class NewSampler:
    session_id: str
    base_model: str
    record_stability_info: bool


@dataclass
class ParsedRequest:
    queue_key: str
    item: ops.WorkItem
    run: TrainingRun | None = None
    """A run this request creates; registered when it is queued."""
    checkpoint: CheckpointPath | None = None
    """A checkpoint this request saves; recorded when it succeeds."""
    ttl_seconds: int | None = None
    checkpoint_metadata: dict[str, str] | None = None
    """Labels of the checkpoint this request saves."""
    record_stability_info: bool = False
    """A sample whose sequences are recorded for provenance when it succeeds."""
    ephemeral: bool = False
    """An unnamed sampler snapshot: it expires, and a newer one of its run replaces it."""
    sampler: NewSampler | None = None
    """A sampler to register, held by the caller, when the snapshot this request saves is made."""
    sequence_ids: frozenset[str] = frozenset()
    """Recorded sequences this request's provenance spans name; queuing it counts as their use."""
    restore: RestorePoint | None = None
    """The run's restore point once this request succeeds (it creates, loads or saves its state)."""
    base_model: str = ""
    """For a sample of the bare base model: which one (any of its replicas can run it)."""


class RequestParser:
    def __init__(self, served: ServedModels, runs: Runs, limits: Limits) -> None:
        self._served = served
        self._runs = runs
        self._limits = limits
        self._model: ops.ModelInfo
        """The base model of the request being parsed (parsing is synchronous: one at a time)."""

    def _use_model(self, field: str, name: str) -> None:
        """The request is for base model `name`: checked against it from here on."""
        model = self._served.get(name)
        if model is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND, f"{field} {name!r} is not served here; served: {self._served.names}"
            )
        self._model = model

    def parse(self, request: service_pb2.SessionRequest) -> ParsedRequest:
        self._model = self._served.default  # until the request names its base model
        kind = request.WhichOneof("request")
        if kind is None:
            raise invalid("request: no operation set (expected one of create_model, forward, ...)")
        if kind == "batch":  # the stream unpacks a batch; one inside it is not unpacked again
            raise invalid("batch: a batch inside a batch; put its requests in the outer one")
        if kind == "create_model":
            return self._create_model(request.create_model)
        if kind == "create_model_from_state":
            return self._create_model_from_state(request.create_model_from_state)
        if kind == "sample":
            return self._sample(request.sample)
        model_id = self._existing_model(request.model_id)
        if kind in ("forward", "forward_backward"):
            return self._forward_backward(kind, model_id, getattr(request, kind), backward=kind == "forward_backward")
        if kind == "optim_step":
            operation = self._optim_step(request.optim_step)
        elif kind == "load_state":
            return self._load_state(model_id, request.load_state)
        elif kind == "save_weights_for_sampler":
            save = request.save_weights_for_sampler
            ttl = save.ttl_seconds if save.HasField("ttl_seconds") else None
            if not save.name:
                parsed = self._ephemeral_save(model_id, ttl, dict(save.user_metadata))
            else:
                parsed = self._save(kind, model_id, "sampler", save.name, ttl, False, dict(save.user_metadata))
            if save.HasField("sampler"):
                self._session("save_weights_for_sampler.sampler.session_id", save.sampler.session_id)
                base_model = self._runs.store.run(model_id).base_model
                parsed.sampler = NewSampler(save.sampler.session_id, base_model, save.sampler.record_stability_info)
            return parsed
        elif kind == "save_state":
            save = request.save_state
            ttl = save.ttl_seconds if save.HasField("ttl_seconds") else None
            return self._save(kind, model_id, "training", save.name, ttl, save.overwrite, dict(save.user_metadata))
        elif kind == "save_weights_external":
            save = request.save_weights_external
            try:
                parse_recipients(save.age_encryption_recipients)
            except ValueError as error:
                raise invalid(f"save_weights_external.age_encryption_recipients{error}") from error
            ttl = save.ttl_seconds if save.HasField("ttl_seconds") else None
            recipients = tuple(save.age_encryption_recipients)
            return self._save(kind, model_id, "external", save.name, ttl, False, {}, recipients)
        else:  # a newer client's operation this server does not know
            raise invalid(f"request: unsupported operation {kind!r}")
        return ParsedRequest(model_id, ops.WorkItem("", model_id, operation))

    # -- models ----------------------------------------------------------------------

    def _existing_model(self, model_id: str, field: str = "model_id") -> str:
        if not model_id:
            raise invalid(f"{field}: required for this operation")
        run = self._runs.owned_run(model_id, current_owner.get())
        if run is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{field} {model_id!r}: no such training run")
        # Refused once closed (its unload may still be queued) or lost in a crash; a run of an
        # earlier server process, not live yet, is brought back on its request.
        if run.closed:
            why = "its session was closed, which unloads it"
        else:
            why = None if self._runs.is_live(model_id) else self._runs.lost_reason(model_id)
        if why is not None:
            saved = self._runs.last_checkpoint(model_id, "training")
            hint = f"its last checkpoint is {saved.path}" if saved else "it has no saved checkpoint"
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{field} {model_id!r}: {why}, and its unsaved state is gone; {hint}: continue with "
                "create_training_client_from_state",
            )
        self._use_model(f"{field} {model_id!r}: its base_model", run.base_model)
        return model_id

    def _check_base_model(self, field: str, name: str) -> None:
        self._use_model(field, name)

    def _check_capacity(self) -> None:
        """Runs beyond the worker's resident ones wait in host memory or on disk: what is bounded
        here is how many one owner keeps."""
        limit = self._limits.max_runs_per_owner
        if self._runs.live_count(current_owner.get()) >= limit:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"you have {limit} live training runs, the limit per owner; close a session (ServiceClient.close) "
                "to unload its runs, or continue a run from a checkpoint",
            )

    def _session(self, field: str, session_id: str) -> Session:
        """The caller's session `session_id`; an empty one for no session."""
        if not session_id:
            return Session("", current_owner.get(), 0.0)
        session = self._runs.store.session(session_id)
        if session is None or session.owner != current_owner.get():
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{field}: no session {session_id!r}")
        return session

    def _new_run(
        self,
        field: str,
        request: training_pb2.CreateModelRequest | training_pb2.CreateModelFromStateRequest,
        base_model: str,
        lora: ops.LoraSpec,
        optimizer: str,
    ) -> TrainingRun:
        """A run of the request's session: in its project, labelled with its labels and then the run's own."""
        session = self._session(f"{field}.session_id", request.session_id)
        return TrainingRun(
            new_model_id(),
            "",
            base_model,
            lora,
            {**session.user_metadata, **request.user_metadata},
            session_id=request.session_id,
            project_id=session.project_id,
            optimizer=optimizer,
        )

    @staticmethod
    def _optimizer(field: str, config: training_pb2.OptimizerConfig) -> str:
        if config.type not in ("", "adamw"):
            raise invalid(f"{field}.type: {config.type!r} is not implemented by this server; it trains with 'adamw'")
        return "adamw"

    def _check_lora_flags(self, field: str, lora: training_pb2.LoraConfig) -> None:
        """Every flag set is honoured in full on this architecture, or refused naming what it misses."""
        model = self._model
        for kind, flag in (("attn", "train_attn"), ("mlp", "train_mlp"), ("unembed", "train_unembed")):
            if not getattr(lora, flag):
                continue
            if unsupported := model.lora_unsupported.get(kind):
                raise RequestError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{field}.{flag}: {model.model_type or model.arch} has weights this flag covers that this server "
                    f"cannot adapt: {', '.join(unsupported[:3])}; set {flag}=False to train the rest",
                )
            if not model.lora_targets.get(kind):
                raise invalid(f"{field}.{flag}: {model.model_type or model.arch} has no {kind} weights to adapt")

    def _create_model(self, request: training_pb2.CreateModelRequest) -> ParsedRequest:
        self._check_base_model("create_model.base_model", request.base_model)
        optimizer = self._optimizer("create_model.optimizer", request.optimizer)
        self._check_capacity()
        lora = request.lora_config
        if not 1 <= lora.rank <= self._limits.max_lora_rank:
            raise invalid(
                f"create_model.lora_config.rank: {lora.rank} is out of range [1, {self._limits.max_lora_rank}]"
            )
        if not (lora.train_mlp or lora.train_attn or lora.train_unembed):
            raise invalid("create_model.lora_config: at least one of train_mlp, train_attn, train_unembed must be true")
        self._check_lora_flags("create_model.lora_config", lora)
        seed = lora.seed if lora.HasField("seed") else secrets.randbits(31)
        spec = ops.LoraSpec(lora.rank, seed, lora.train_mlp, lora.train_attn, lora.train_unembed, LORA_ALPHA)
        run = self._new_run("create_model", request, request.base_model, spec, optimizer)
        return ParsedRequest(run.model_id, ops.WorkItem("", run.model_id, ops.CreateAdapter(spec)), run=run)

    def import_adapter(
        self, files: set[str], config_json: bytes | None, user_metadata: dict[str, str]
    ) -> tuple[ParsedRequest, CheckpointPath]:
        """A new run from a peft adapter's files (their names, and the config's content), and
        where its `imported` checkpoint goes (the caller puts the files there, then queues it)."""
        if files != IMPORT_FILES or config_json is None:
            raise invalid(f"files: {sorted(files)}; expected exactly {sorted(IMPORT_FILES)}")
        self._check_checkpoint_quota("import")
        field = f"files['{CONFIG_FILE}']"
        try:
            config = json.loads(config_json)
            rank, alpha = config["r"], config.get("lora_alpha", LORA_ALPHA)
        except (ValueError, KeyError, TypeError) as error:
            raise invalid(f"{field}: unreadable ({error})") from error
        limit = self._limits.max_lora_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
            raise invalid(f"{field}.r: {rank!r}; expected an integer in [1, {limit}]")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
            raise invalid(f"{field}.lora_alpha: {alpha!r}; expected a positive number")
        self._check_capacity()
        lora = ops.LoraSpec(rank, 0, False, False, False, float(alpha))  # the worker reports the layers it adapts
        run = TrainingRun(new_model_id(), "", self._served.default.name, lora, user_metadata)
        path = CheckpointPath(run.model_id, "training", "imported")
        item = ops.WorkItem("", run.model_id, ops.CreateAdapter(lora, str(self._runs.directory(path))))
        return ParsedRequest(run.model_id, item, run=run, restore=RestorePoint(str(path))), path

    def _create_model_from_state(self, request: training_pb2.CreateModelFromStateRequest) -> ParsedRequest:
        field = "create_model_from_state"
        check_no_access_token(f"{field}.weights_access_token", request.weights_access_token)
        path, source = self._checkpoint_source(f"{field}.path", request.path, training_only=request.with_optimizer)
        if request.base_model and request.base_model != source.base_model:
            raise invalid(
                f"{field}.base_model: {request.base_model!r}, but {request.path} adapts {source.base_model!r}"
            )
        if request.with_optimizer:
            optimizer = source.optimizer  # the checkpoint's optimizer state belongs to its optimizer
        else:
            optimizer = self._optimizer(f"{field}.optimizer", request.optimizer)
        self._check_capacity()
        run = self._new_run(field, request, source.base_model, source.lora, optimizer)
        operation = ops.CreateAdapter(source.lora, str(self._runs.directory(path)), request.with_optimizer)
        restore = RestorePoint(str(path), request.with_optimizer, self._runs.checkpoint(path).step)
        return ParsedRequest(run.model_id, ops.WorkItem("", run.model_id, operation), run=run, restore=restore)

    def _checkpoint_source(self, field: str, text: str, training_only: bool) -> tuple[CheckpointPath, TrainingRun]:
        """A saved checkpoint to load from (the caller's, or a published one), and the run that saved it."""
        try:
            path = CheckpointPath.parse(text)
        except ValueError as error:
            raise invalid(f"{field}: {error}") from error
        found = self._runs.readable_checkpoint(path, current_owner.get())
        if found is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"{field}: no checkpoint {text}")
        _, source = found
        self._use_model(f"{field} {text}: its base_model", source.base_model)
        if path.checkpoint_type == "external":
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{field}: {text} is an export for use elsewhere (download it with get_external_weights_urls); "
                "use the run's tinker://<run>/weights/<name> or sampler_weights/<name> checkpoints here",
            )
        if training_only and path.checkpoint_type != "training":
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{field}: {text} holds no optimizer state; use a tinker://<run>/weights/<name> checkpoint",
            )
        return path, source

    def _load_state(self, model_id: str, request: training_pb2.LoadStateRequest) -> ParsedRequest:
        """From a checkpoint, or (tinker://<run>/initial) back to the run's seeded creation."""
        check_no_access_token("load_state.weights_access_token", request.weights_access_token)
        if request.path == initial_path(model_id):
            operation, restore = ops.LoadState(None, False), RestorePoint()
        else:
            path, _ = self._checkpoint_source("load_state.path", request.path, training_only=request.with_optimizer)
            step = self._runs.checkpoint(path).step
            operation = ops.LoadState(str(self._runs.directory(path)), request.with_optimizer)
            restore = RestorePoint(str(path), request.with_optimizer, step)
        return ParsedRequest(model_id, ops.WorkItem("", model_id, operation), restore=restore)

    # -- forward / backward ----------------------------------------------------------

    def _forward_backward(
        self, kind: str, model_id: str, request: training_pb2.ForwardBackwardInput, backward: bool
    ) -> ParsedRequest:
        spec = LOSS_SPECS.get(request.loss_fn)
        if spec is None:
            raise invalid(f"{kind}.loss_fn: unknown loss {request.loss_fn!r}; expected one of {sorted(LOSS_SPECS)}")
        config = self._loss_config(kind, spec, dict(request.loss_fn_config), dict(request.loss_fn_config_strings))
        if not request.data:
            raise invalid(f"{kind}.data: empty batch; send at least one datum")
        spans = SpanChecker(self._runs.store, current_owner.get(), time.time())
        data = [self._datum(f"{kind}.data[{index}]", spec, datum, spans) for index, datum in enumerate(request.data)]
        total_tokens = sum(len(datum.tokens) for datum in data)
        if total_tokens > self._limits.max_batch_tokens:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{kind}.data: {total_tokens} tokens exceed the per-request limit of {self._limits.max_batch_tokens}",
            )
        operation = ops.ForwardBackward(data, spec.name, config, backward)
        return ParsedRequest(model_id, ops.WorkItem("", model_id, operation), sequence_ids=spans.used)

    @staticmethod
    def _loss_config(kind: str, spec: LossSpec, given: dict[str, float], strings: dict[str, str]) -> dict[str, float]:
        if strings:
            raise invalid(
                f"{kind}.loss_fn_config_strings[{min(strings)!r}]: {spec.name} takes no text values; "
                f"its numeric keys (send them in loss_fn_config): {sorted(spec.config_defaults)}"
            )
        unknown = sorted(set(given) - set(spec.config_defaults))
        if unknown:
            raise invalid(
                f"{kind}.loss_fn_config: unknown key(s) {unknown} for {spec.name}; "
                f"accepted: {sorted(spec.config_defaults)}"
            )
        for key, value in given.items():
            if not math.isfinite(value):
                raise invalid(f"{kind}.loss_fn_config[{key!r}]: {value} is not finite")
            if key in spec.config_rules and not spec.config_rules[key][0](value):
                raise invalid(f"{kind}.loss_fn_config[{key!r}]: {value}; must be {spec.config_rules[key][1]}")
        return {**spec.config_defaults, **given}

    def _model_input(self, field: str, model_input: training_pb2.ModelInput) -> np.ndarray:
        """A datum's input or a prompt as int64 token ids: its `tokens`, or its token chunks concatenated."""
        if model_input.HasField("tokens") == bool(model_input.chunks):
            raise invalid(f"{field}: set exactly one of tokens or chunks")
        if model_input.HasField("tokens"):
            where, tokens = f"{field}.tokens", self._tokens(f"{field}.tokens", model_input.tokens)
        else:
            chunks = [self._chunk(f"{field}.chunks[{index}]", chunk) for index, chunk in enumerate(model_input.chunks)]
            where, tokens = f"{field}.chunks", np.concatenate(chunks)
        max_length = self._model.max_context_length
        if not 1 <= len(tokens) <= max_length:
            raise invalid(f"{where}: {len(tokens)} tokens; expected 1 to {max_length}")
        return tokens

    def _chunk(self, field: str, chunk: training_pb2.ModelInputChunk) -> np.ndarray:
        kind = chunk.WhichOneof("chunk")
        if kind == "tokens":
            return self._tokens(f"{field}.tokens", chunk.tokens)
        if kind is None:
            raise invalid(f"{field}: empty chunk; set tokens, image or image_asset_pointer")
        raise invalid(f"{field}: an {kind} chunk, but {self._model.name} takes text only")

    def _tokens(self, field: str, tensor: tensor_pb2.TensorData) -> np.ndarray:
        tokens = self._decode(field, tensor)
        if tokens.dtype.kind != "i":
            raise invalid(f"{field}: dtype {tokens.dtype.name} is not an integer type; send int32 or int64")
        if tokens.ndim != 1:
            raise invalid(f"{field}: shape {list(tokens.shape)}; expected [N]")
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

    def _datum(self, field: str, spec: LossSpec, datum: training_pb2.Datum, spans: SpanChecker) -> ops.DatumArrays:
        tokens = self._model_input(f"{field}.model_input", datum.model_input)
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
        if spec.needs_provenance:
            inputs |= self._provenance(field, spec, datum, tokens, inputs["target_tokens"], spans).loss_inputs()
        return ops.DatumArrays(tokens, inputs)

    @staticmethod
    def _provenance(
        field: str,
        spec: LossSpec,
        datum: training_pb2.Datum,
        tokens: np.ndarray,
        targets: np.ndarray,
        spans: SpanChecker,
    ) -> DatumProvenance:
        """The datum's spans, checked, for a loss that reads what they name. Other losses leave
        spans alone, as Tinker's do: the cookbook's RL trainer attaches them to every datum,
        whether or not its sequences were sampled with record_stability_info (and so recorded)."""
        try:
            provenance = spans.check(field, datum, tokens, targets)
        except SpanError as error:
            code = grpc.StatusCode.FAILED_PRECONDITION if error.expired else grpc.StatusCode.INVALID_ARGUMENT
            raise RequestError(code, str(error)) from error
        if provenance is None:
            raise invalid(
                f"{field}: {spec.name} needs provenance (model_input_spans and loss_fn_input_spans): build the "
                "datum with Datum.with_provenance from sequences sampled with record_stability_info=True"
            )
        return provenance

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
        self,
        kind: str,
        model_id: str,
        checkpoint_type: CheckpointType,
        name: str,
        ttl: int | None,
        overwrite: bool,
        user_metadata: dict[str, str],
        age_recipients: tuple[str, ...] = (),
    ) -> ParsedRequest:
        if not is_safe_name(name):
            raise invalid(f"{kind}.name: {name!r}; use 1-128 characters from [A-Za-z0-9._-], not starting with '.'")
        check_ttl(f"{kind}.ttl_seconds", ttl)
        self._check_checkpoint_quota(kind)
        path = CheckpointPath(model_id, checkpoint_type, name)
        if not overwrite and self._runs.checkpoint_exists(path):
            hint = "; pass overwrite=True to replace it" if kind == "save_state" else ""
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"{kind}.name: {path} already exists{hint}")
        directory = str(self._runs.directory(path))
        base_model = self._runs.store.run(model_id).base_model
        if checkpoint_type == "training":
            operation: ops.Operation = ops.SaveState(str(path), directory, base_model=base_model)
        elif checkpoint_type == "external":
            operation = ops.SaveExternal(str(path), directory, base_model, age_recipients)
        else:
            operation = ops.SaveForSampler(str(path), directory, base_model=base_model)
        item = ops.WorkItem("", model_id, operation)
        # A training checkpoint becomes the run's restore point (at its step, known when it is saved).
        restore = RestorePoint(str(path), True) if checkpoint_type == "training" else None
        return ParsedRequest(
            model_id, item, checkpoint=path, ttl_seconds=ttl, checkpoint_metadata=user_metadata, restore=restore
        )

    def checkpoint_bytes_left(self) -> int:
        """What the caller may still save before their checkpoint quota."""
        used = self._runs.store.owner_checkpoint_bytes(current_owner.get())
        return max(0, self._limits.max_checkpoint_bytes_per_owner - used)

    def _check_checkpoint_quota(self, kind: str) -> None:
        if self.checkpoint_bytes_left() == 0:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{kind}: your checkpoints fill the quota per owner (--max-checkpoint-bytes-per-owner "
                f"{self._limits.max_checkpoint_bytes_per_owner}); delete some (RestClient.delete_checkpoint) or "
                "save with a ttl",
            )

    def _ephemeral_save(self, model_id: str, ttl: int | None, user_metadata: dict[str, str]) -> ParsedRequest:
        """An unnamed snapshot: usable as soon as the device copy is made (its files are written in
        the background); it expires, and goes sooner once its run has a newer one and no sampling
        client holds it."""
        check_ttl("save_weights_for_sampler.ttl_seconds", ttl)
        self._check_checkpoint_quota("save_weights_for_sampler")
        path = CheckpointPath(model_id, "sampler", f"ephemeral-{secrets.token_hex(6)}")
        base_model = self._runs.store.run(model_id).base_model
        operation = ops.SaveForSampler(str(path), str(self._runs.directory(path)), True, base_model)
        return ParsedRequest(
            model_id,
            ops.WorkItem("", model_id, operation),
            checkpoint=path,
            ttl_seconds=ttl or int(self._limits.ephemeral_ttl_seconds),
            checkpoint_metadata=user_metadata,
            ephemeral=True,
        )

    def _sampler_weights(self, field: str, text: str) -> tuple[str, str | None, TrainingRun]:
        """What a sampler path reads: (adapter name, its directory, the run). An in-flight path
        (tinker://<run>/inflight) reads the caller's run's live weights, in the run's order."""
        model_id = inflight_run(text)
        if model_id is None:
            path, run = self._checkpoint_source(field, text, training_only=False)
            return str(path), str(self._runs.directory(path)), run
        self._existing_model(model_id, field)
        return model_id, None, self._runs.store.run(model_id)

    def sampler_source(self, request: service_pb2.CreateSamplerRequest) -> tuple[str, str]:
        """(base model, model path) of a sampler to register; raises RequestError."""
        self._session("create_sampler.session_id", request.session_id)
        source = request.WhichOneof("weights")
        if source is None:
            raise invalid("create_sampler: set one of model_path or base_model")
        if source == "base_model":
            self._check_base_model("create_sampler.base_model", request.base_model)
            return request.base_model, ""
        _, _, run = self._sampler_weights("create_sampler.model_path", request.model_path)
        return run.base_model, request.model_path

    def _sample(self, request: sampling_pb2.SampleRequest) -> ParsedRequest:
        source = request.WhichOneof("weights")
        if source is None:
            raise invalid("sample: set one of model_path or base_model")
        if source == "base_model":
            self._check_base_model("sample.base_model", request.base_model)
            adapter = adapter_dir = None
        else:
            adapter, adapter_dir, _ = self._sampler_weights("sample.model_path", request.model_path)
        prompt = self._model_input("sample.prompt", request.prompt)
        if not 1 <= request.num_samples <= self._limits.max_num_samples:
            raise invalid(f"sample.num_samples: {request.num_samples}; expected 1..{self._limits.max_num_samples}")
        params = self._sampling_params(request.sampling_params, len(prompt))
        vocab_size = self._model.vocab_size
        targets = request.target_prompt_logprobs if request.HasField("target_prompt_logprobs") else None
        operation = ops.Sample(
            adapter,
            adapter_dir,
            prompt,
            request.num_samples,
            params,
            request.include_prompt_logprobs,
            min(self._per_position_k("sample.topk_prompt_logprobs", request.topk_prompt_logprobs), vocab_size),
            topk_sample_logprobs=min(
                self._per_position_k("sample.topk_sample_logprobs", request.topk_sample_logprobs), vocab_size
            ),
            target_prompt_logprobs=None if targets is None else self._prompt_targets(targets, len(prompt)),
            prompt_alt_tokens_k=self._per_position_k("sample.prompt_alt_tokens_k", request.prompt_alt_tokens_k),
            prompt_logprobs_last_n=self._prompt_logprobs_last_n(request, len(prompt)),
        )
        # An in-flight sample takes its place in its run's order; others queue by their weights.
        in_flight = adapter is not None and adapter_dir is None
        return ParsedRequest(
            adapter if in_flight else sampler_queue(adapter or request.base_model, current_owner.get()),
            ops.WorkItem("", "", operation),
            record_stability_info=request.record_stability_info,
            base_model=request.base_model if source == "base_model" else "",
        )

    def _per_position_k(self, field: str, k: int) -> int:
        """A count of tokens asked for at every position (top k, draws): 0 (off) up to the limit."""
        limit = self._limits.max_topk_prompt_logprobs
        if not 0 <= k <= limit:
            raise invalid(f"{field}: {k}; expected 0..{limit}")
        return k

    def _prompt_targets(self, tensor: tensor_pb2.TensorData, prompt_length: int) -> np.ndarray:
        """target_prompt_logprobs: int64 [P-1, K] token ids, -1 where nothing is asked."""
        field, limit = "sample.target_prompt_logprobs", self._limits.max_topk_prompt_logprobs
        targets = self._decode(field, tensor)
        if targets.dtype.kind != "i":
            raise invalid(f"{field}: dtype {targets.dtype.name}; expected int32 or int64")
        if targets.ndim != 2 or targets.shape[0] != prompt_length - 1 or not 1 <= targets.shape[1] <= limit:
            raise invalid(
                f"{field}: shape {list(targets.shape)}; expected [{prompt_length - 1}, K] (the prompt length "
                f"minus 1) with 1 <= K <= {limit}"
            )
        self._check_token_range(field, targets[targets != -1])
        return targets.astype(np.int64)

    @staticmethod
    def _prompt_logprobs_last_n(request: sampling_pb2.SampleRequest, prompt_length: int) -> int | None:
        if not request.HasField("prompt_logprobs_last_n"):
            return None
        field, last_n = "sample.prompt_logprobs_last_n", request.prompt_logprobs_last_n
        if not (request.include_prompt_logprobs or request.topk_prompt_logprobs):
            raise invalid(f"{field}: needs include_prompt_logprobs or topk_prompt_logprobs")
        if not 1 <= last_n < prompt_length:
            raise invalid(f"{field}: {last_n}; expected 1..{prompt_length - 1} (below the prompt length)")
        return last_n

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


def check_no_access_token(field: str, token: str) -> None:
    if token:
        raise invalid(
            f"{field}: this server has no cross-account access tokens; the checkpoint's owner can publish it "
            "(SetCheckpointPublic), which makes it readable by every API key"
        )
