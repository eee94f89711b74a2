"""The worker's engine: one base model, many LoRA adapters, one clock cycle at a time.

A cycle runs in phases (DESIGN.md): adapter creation, one batched forward/backward pass
for every tenant's rows, optimizer steps, sampler snapshots, then batched sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import torch

from tinker_server import ops
from tinker_server.age_encryption import encrypt_files
from tinker_server.files import write_whole
from tinker_server.worker.batching import length_buckets
from tinker_server.worker.checkpoints import (
    CheckpointError,
    directory_size,
    read_adapter,
    read_gradients,
    read_optimizer_state,
    write_adapter,
    write_gradients,
    write_optimizer_state,
)
from tinker_server.worker.decoding import Decoder
from tinker_server.worker.fused_norms import fuse_rms_norms
from tinker_server.worker.kv_cache import default_kv_cache_bytes, joins_rows
from tinker_server.worker.lora import (
    LoraPair,
    RowRouting,
    contiguous_segments,
    init_lora_pairs,
)
from tinker_server.worker.losses import LOSS_FUNCTIONS, LOSS_METRICS
from tinker_server.worker.models import LoadedModel, final_hidden_states, tokenizer_files
from tinker_server.worker.passes import gradients_all_or_nothing, target_logprobs
from tinker_server.worker.residency import Adapter, Residency, ResidencyLimits, weight_bytes
from tinker_server.worker.sampling import SamplingModel
from tinker_server.worker.snapshot_writes import SnapshotWrites
from tinker_server.worker.targets import KINDS, wrap_lora_targets
from tinker_server.worker.transfers import to_device

log = logging.getLogger(__name__)

DatumOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
"""One datum's target logprobs and per-token loss (detached), and the loss inputs it used."""


class OperationError(Exception):
    """An operation that cannot run; fails only the items it names."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Arrays decoded from the wire (or from Ray's object store) are read-only views; torch needs a
    # writable buffer.
    tensor = torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)
    return to_device(tensor, device)


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        max_tokens_per_pass: int = ops.WorkerOptions.max_tokens_per_pass,
        residency: ResidencyLimits | None = None,
        spill_dir: Path | None = None,
        kv_cache_bytes: int = ops.WorkerOptions.kv_cache_bytes,
    ) -> None:
        """`kv_cache_bytes` 0: kv_cache.default_kv_cache_bytes, once the model is on the device."""
        self.loaded = loaded
        self.max_tokens_per_pass = max_tokens_per_pass
        self.device = device
        self.model = loaded.model.to(device)
        self.model.requires_grad_(False)
        fuse_rms_norms(self.model)
        self.routing = RowRouting()
        self.targets = wrap_lora_targets(self.model, self.routing)
        self.layers = self.targets.sites
        if spill_dir is None:  # one of its own, removed with the engine (or at exit)
            self._own_spill_dir = tempfile.TemporaryDirectory(prefix="tinker-spill-")
            spill_dir = Path(self._own_spill_dir.name)
        self.residency = Residency(
            device, spill_dir, residency or ResidencyLimits(), self._register, self._unregister, self._read_snapshot
        )
        self._snapshot_writes = SnapshotWrites()
        max_prefill_tokens = max_tokens_per_pass if joins_rows(self.model.config) else None
        sampler = SamplingModel(
            self.model, self.routing, loaded.tokenizer, loaded.eos_token_ids, device, max_prefill_tokens
        )
        kv_cache_bytes = kv_cache_bytes or default_kv_cache_bytes(device)
        log.info("keys and values of sampling: up to %.2f GiB (--kv-cache-bytes)", kv_cache_bytes / 2**30)
        self.decoder = Decoder(sampler, kv_cache_bytes, release=self._release_copy)
        self._snapshot_copies: dict[str, tuple[str, int]] = {}
        """Snapshot -> the copy of its weights the generations reading it share, and its bytes."""
        self._generation_ids = itertools.count()

    def finish_writes(self) -> None:
        """Writes the files of every snapshot whose write is still pending (before the worker stops)."""
        self._snapshot_writes.finish_all()

    def info(self) -> ops.ModelInfo:
        config = self.model.config
        return ops.ModelInfo(
            name=self.loaded.name,
            arch=(config.architectures or [type(self.model).__name__])[0],
            vocab_size=int(config.vocab_size),
            max_context_length=self.loaded.max_context_length,
            eos_token_id=self.loaded.tokenizer.eos_token_id,
            eos_token_ids=self.loaded.eos_token_ids,
            tokenizer_files=tokenizer_files(self.loaded.tokenizer),
            model_type=getattr(config, "model_type", ""),
            lora_targets={kind: tuple(self.targets.paths(kind)) for kind in KINDS},
            lora_unsupported={kind: tuple(found) for kind, found in self.targets.unsupported.items()},
        )

    # -- the cycle -------------------------------------------------------------------

    def run_cycle(
        self, cycle: ops.Cycle, decode_seconds: float | None = None, interrupt: Callable[[], bool] | None = None
    ) -> list[ops.Outcome]:
        """Runs the cycle's operations, phase by phase; its samples join the generations under way,
        which then decode for `decode_seconds` (None: until every one is done; see Decoder.decode
        for `interrupt`). Returns the outcomes ready: the cycle's, in order (samples only once
        generated), then those of earlier cycles' samples that finished now."""
        by_phase: dict[ops.Phase, list[ops.WorkItem]] = defaultdict(list)
        for item in cycle.items:
            by_phase[item.operation.phase].append(item)
        results: dict[str, ops.Outcome] = {}
        batched: dict[ops.Phase, Callable[[list[ops.WorkItem]], list[ops.OpResult | ops.OpError]]] = {
            ops.Phase.FORWARD: lambda group: self._per_item(group, self._check_adapter, self._forward_backward),
            ops.Phase.SAMPLE: lambda group: self._per_item(
                group, self._check_sample, lambda ready: self._start_generation(ready, decode_seconds is not None)
            ),
        }
        single: dict[type, Callable[[ops.WorkItem], ops.OpResult]] = {
            ops.CreateAdapter: self._create_adapter,
            ops.LoadState: self._load_state,
            ops.OptimStep: self._optim_step,
            ops.SaveForSampler: self._save_for_sampler,
            ops.SaveState: self._save_state,
            ops.SaveExternal: self._save_external,
            ops.DeleteCheckpoint: self._delete_checkpoint,
            ops.Unload: self._unload,
        }
        for phase in sorted(by_phase):
            items = by_phase[phase]
            groups = [items] if phase in batched else [[item] for item in items]
            for group in groups:
                try:
                    if phase in batched:
                        outputs = batched[phase](group)
                    else:
                        outputs = [single[type(group[0].operation)](group[0])]
                except (OperationError, CheckpointError) as error:
                    outputs = [ops.OpError(error.code.value[0], str(error))] * len(group)
                except Exception as error:  # a bug must fail its requests, not the worker
                    log.exception("cycle %d: %s failed", cycle.cycle_id, phase.name)
                    message = f"internal error in {phase.name.lower()}: {error}"
                    outputs = [ops.OpError(grpc.StatusCode.INTERNAL.value[0], message)] * len(group)
                for item, output in zip(group, outputs, strict=True):
                    if output is _GENERATING:
                        continue
                    outcome = ops.Outcome(item.future_id, cycle.cycle_id)
                    if isinstance(output, ops.OpError):
                        outcome.error = output
                    else:
                        outcome.result = output
                    results[item.future_id] = outcome
        for outcome in self.decoder.decode(cycle.cycle_id, decode_seconds, interrupt, answering=bool(results)):
            results[outcome.future_id] = outcome
        self.residency.settle()  # between cycles, adapters keep within the limits
        ordered = [results.pop(item.future_id) for item in cycle.items if item.future_id in results]
        return ordered + list(results.values())

    @staticmethod
    def _per_item(
        items: list[ops.WorkItem],
        check: Callable[[ops.WorkItem], None],
        run: Callable[[list[ops.WorkItem]], list[ops.OpResult]],
    ) -> list[ops.OpResult | ops.OpError]:
        """Runs the items that pass `check` as one batch; one that fails it fails alone."""
        outputs: list[ops.OpResult | ops.OpError | None] = [None] * len(items)
        ready = []
        for index, item in enumerate(items):
            try:
                check(item)
                ready.append(index)
            except (OperationError, CheckpointError) as error:
                outputs[index] = ops.OpError(error.code.value[0], str(error))
        if ready:
            for index, output in zip(ready, run([items[index] for index in ready]), strict=True):
                outputs[index] = output
        return outputs

    # -- adapters --------------------------------------------------------------------

    def _check_adapter(self, item: ops.WorkItem) -> None:
        self._adapter(item.model_id)

    def _adapter(self, model_id: str) -> Adapter:
        """The run's adapter, resident (brought back from host memory or disk if it had left)."""
        adapter = self.residency.run(model_id)
        if adapter is None:
            raise OperationError(grpc.StatusCode.NOT_FOUND, f"model_id {model_id!r}: no such adapter")
        return adapter

    def _register(self, name: str, pairs: dict[str, LoraPair]) -> None:
        self._forget_weights(name)
        for path, pair in pairs.items():
            self.layers[path].adapters[name] = pair

    def _unregister(self, name: str) -> None:
        self._forget_weights(name)
        for layer in self.layers.values():
            layer.adapters.pop(name, None)

    def _forget_weights(self, name: str) -> None:
        """`name`'s weights change or leave: what was derived from them (prompts kept for reuse,
        the copy generations share) is not for later requests."""
        self.decoder.forget_prompts(name)
        self._snapshot_copies.pop(name, None)

    def _install(
        self, name: str, spec: ops.LoraSpec, pairs: dict[str, LoraPair], optimizer_state: Path | None = None
    ) -> None:
        """Makes `pairs` the adapter `name`, with a fresh AdamW or the one saved in `optimizer_state`.
        Everything is read before anything is replaced: a failure leaves the run as it was."""
        adapter = Adapter(name, spec, pairs)
        if optimizer_state is not None:
            read_optimizer_state(optimizer_state, pairs, adapter.optimizer)
        self.residency.add_run(adapter)

    def _create_adapter(self, item: ops.WorkItem) -> ops.CreateAdapterResult:
        operation: ops.CreateAdapter = item.operation
        if operation.source_dir is None:
            spec, pairs = operation.lora, init_lora_pairs(self.layers, operation.lora, self.device)
        else:
            spec, pairs = read_adapter(Path(operation.source_dir), self.layers, self.device)
            spec = dataclasses.replace(spec, seed=operation.lora.seed)
        optimizer_state = Path(operation.source_dir) if operation.with_optimizer else None
        if operation.with_gradients:
            read_gradients(Path(operation.source_dir), pairs)
        self._install(item.model_id, spec, pairs, optimizer_state)
        return ops.CreateAdapterResult(item.model_id, spec, tuple(sorted(pairs)))

    def _load_state(self, item: ops.WorkItem) -> ops.LoadStateResult:
        operation: ops.LoadState = item.operation
        current = self._adapter(item.model_id)
        if operation.source_dir is None:
            self._install(item.model_id, current.spec, init_lora_pairs(self.layers, current.spec, self.device))
            return ops.LoadStateResult()
        spec, pairs = read_adapter(Path(operation.source_dir), self.layers, self.device)
        if spec.rank != current.spec.rank or set(pairs) != set(current.pairs):
            raise OperationError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"load_state.path: the checkpoint's adapter (rank {spec.rank}, {len(pairs)} layers) does not fit "
                f"this run's (rank {current.spec.rank}, {len(current.pairs)} layers); use "
                "create_training_client_from_state to start a run from it",
            )
        optimizer_state = Path(operation.source_dir) if operation.with_optimizer else None
        self._install(item.model_id, current.spec, pairs, optimizer_state)
        return ops.LoadStateResult()

    # -- forward / backward ----------------------------------------------------------

    def _forward_backward(self, items: list[ops.WorkItem]) -> list[ops.OpResult]:
        """Every datum of every item, in length buckets (little padding) of at most
        max_tokens_per_pass padded tokens; within a bucket the rows of all adapters share one
        pass over the base model. The phase's gradients land all together or, if anything fails,
        not at all."""
        rows = [
            (item_index, datum_index, datum)
            for item_index, item in enumerate(items)
            for datum_index, datum in enumerate(item.operation.data)
        ]
        outputs: list[list[DatumOutput | None]] = [[None] * len(item.operation.data) for item in items]
        with gradients_all_or_nothing(self._adapter_parameters(items, True), self._adapter_parameters(items, False)):
            for bucket in length_buckets([len(datum.tokens) for _, _, datum in rows], self.max_tokens_per_pass):
                self._forward_bucket(items, [rows[row] for row in bucket], outputs)
            return [self._forward_result(item.operation, output) for item, output in zip(items, outputs, strict=True)]

    def _adapter_parameters(self, items: list[ops.WorkItem], backward: bool) -> list[torch.Tensor]:
        """The parameters of the adapters of the items that do (or do not) train them."""
        return [
            param
            for item in items
            if item.operation.backward == backward
            for param in self._adapter(item.model_id).parameters()
        ]

    def _forward_bucket(
        self,
        items: list[ops.WorkItem],
        rows: list[tuple[int, int, ops.DatumArrays]],
        outputs: list[list[DatumOutput | None]],
    ) -> None:
        """One padded pass, its backward right away and with the rows' adapters still routed (the
        recomputed chunks and layers go through them again); each pass's graph is freed before
        the next one's."""
        rows = sorted(rows, key=lambda row: items[row[0]].model_id)  # contiguous rows per adapter
        width = max(len(datum.tokens) for _, _, datum in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (_, _, datum) in enumerate(rows):
            input_ids[row, : len(datum.tokens)] = as_tensor(datum.tokens, input_ids.device)
        inputs = [
            {key: as_tensor(value, self.device) for key, value in datum.loss_fn_inputs.items()} for *_, datum in rows
        ]
        targets = [row_inputs.pop("target_tokens") for row_inputs in inputs]
        segments = contiguous_segments([items[item_index].model_id for item_index, _, _ in rows])
        needs_grad = any(items[item_index].operation.backward for item_index, _, _ in rows)

        with torch.set_grad_enabled(needs_grad), self.routing.route(segments):
            hidden = final_hidden_states(self.model, input_ids=to_device(input_ids, self.device), use_cache=False)
            logprobs = target_logprobs(self.model, hidden, self._padded_targets(targets, width))  # [B, T, K]
            to_backward = []
            for row, (item_index, datum_index, _) in enumerate(rows):
                operation: ops.ForwardBackward = items[item_index].operation
                target = targets[row]
                row_logprobs = logprobs[row, : target.shape[0], : target[0].numel()].reshape(target.shape)
                loss = LOSS_FUNCTIONS[operation.loss_fn](row_logprobs, inputs[row], operation.loss_fn_config)
                outputs[item_index][datum_index] = (row_logprobs.detach(), loss.detach(), inputs[row])
                if operation.backward:
                    to_backward.append(loss.sum())
            if to_backward:
                torch.stack(to_backward).sum().backward()

    def _padded_targets(self, targets: list[torch.Tensor], width: int) -> torch.Tensor:
        """Each row's targets, [N] or [N, K] (top-K form), zero-padded into one [B, width, K]."""
        flat = [target.reshape(target.shape[0], -1).long() for target in targets]
        shape = (len(flat), width, max(target.shape[1] for target in flat))
        padded = torch.zeros(shape, dtype=torch.long, device=self.device)
        for row, target in enumerate(flat):
            padded[row, : target.shape[0], : target.shape[1]] = target
        return padded

    @staticmethod
    def _forward_result(operation: ops.ForwardBackward, outputs: list[DatumOutput]) -> ops.ForwardBackwardResult:
        loss_fn_outputs = [
            {
                "logprobs": logprobs.cpu().numpy().astype(np.float32),
                "elementwise_loss": loss.cpu().numpy().astype(np.float32),
            }
            for logprobs, loss, _ in outputs
        ]
        metrics = {"loss:sum": float(sum(float(loss.sum()) for _, loss, _ in outputs))}
        if (loss_metrics := LOSS_METRICS.get(operation.loss_fn)) is not None:
            logprobs, inputs = [output[0] for output in outputs], [output[2] for output in outputs]
            metrics |= loss_metrics(logprobs, inputs, operation.loss_fn_config)
        return ops.ForwardBackwardResult(loss_fn_outputs, metrics)

    # -- optimizer -------------------------------------------------------------------

    def _optim_step(self, item: ops.WorkItem) -> ops.OptimStepResult:
        adapter = self._adapter(item.model_id)
        adam: ops.AdamConfig = item.operation.adam
        params = adapter.parameters()
        max_norm = adam.grad_clip_norm if adam.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer = adapter.optimizer
        for group in optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ops.OptimStepResult({"grad_norm": float(grad_norm), "learning_rate": adam.learning_rate})

    # -- checkpoints ---------------------------------------------------------------

    def _save_for_sampler(self, item: ops.WorkItem) -> ops.SaveCheckpointResult:
        adapter = self._adapter(item.model_id)
        operation: ops.SaveForSampler = item.operation
        snapshot = {
            path: LoraPair(pair.A.detach().clone(), pair.B.detach().clone(), pair.scaling)
            for path, pair in adapter.pairs.items()
        }
        directory = Path(operation.directory)
        base_model = ops.named_base_model(operation, self.loaded.name)
        write = functools.partial(self._write_sampler_weights, directory, adapter.spec, snapshot, base_model)
        if operation.ephemeral:  # usable now; its files follow in the background, unless it goes first
            writing = self._snapshot_writes.submit(write)
            self.residency.add_snapshot(operation.path, adapter.spec, snapshot, directory, writing)
            return ops.SaveCheckpointResult(operation.path, weight_bytes(snapshot))
        write()
        self.residency.add_snapshot(operation.path, adapter.spec, snapshot, directory, None)
        return ops.SaveCheckpointResult(operation.path, directory_size(directory))

    def _save_state(self, item: ops.WorkItem) -> ops.SaveCheckpointResult:
        adapter = self._adapter(item.model_id)
        operation: ops.SaveState = item.operation
        directory = Path(operation.directory)
        base_model = ops.named_base_model(operation, self.loaded.name)

        def write(staging: Path) -> None:
            write_adapter(staging, adapter.spec, adapter.pairs, base_model, self.layers)
            write_optimizer_state(staging, adapter.pairs, adapter.optimizer)
            if operation.with_gradients:
                write_gradients(staging, adapter.pairs)

        write_whole(directory, write)
        return ops.SaveCheckpointResult(operation.path, directory_size(directory))

    def _save_external(self, item: ops.WorkItem) -> ops.SaveCheckpointResult:
        adapter = self._adapter(item.model_id)
        operation: ops.SaveExternal = item.operation
        directory = Path(operation.directory)
        base_model = ops.named_base_model(operation, self.loaded.name)

        def write(staging: Path) -> None:
            write_adapter(staging, adapter.spec, adapter.pairs, base_model, self.layers)
            if operation.age_recipients:
                encrypt_files(staging, operation.age_recipients)

        write_whole(directory, write)
        return ops.SaveCheckpointResult(operation.path, directory_size(directory))

    def _write_sampler_weights(
        self, directory: Path, spec: ops.LoraSpec, pairs: dict[str, LoraPair], base_model: str
    ) -> None:
        write_whole(directory, lambda staging: write_adapter(staging, spec, pairs, base_model, self.layers))

    def _delete_checkpoint(self, item: ops.WorkItem) -> ops.DeleteCheckpointResult:
        operation: ops.DeleteCheckpoint = item.operation
        if self.residency.has_snapshot(operation.path):
            self.residency.drop(operation.path)  # after its background write, if one is running
        shutil.rmtree(operation.directory, ignore_errors=True)
        return ops.DeleteCheckpointResult()

    def _unload(self, item: ops.WorkItem) -> ops.UnloadResult:
        self.residency.write_out_snapshots(f"tinker://{item.model_id}/")
        self.residency.drop(item.model_id)
        return ops.UnloadResult()

    def _check_sample(self, item: ops.WorkItem) -> None:
        """The sample fits the KV cache budget, and the weights it reads are resident: a snapshot
        (loaded from its files on first use, e.g. after a restart) or, for an in-flight sampler,
        the run's live adapter."""
        request: ops.Sample = item.operation
        if reason := self.decoder.too_large(request):
            raise OperationError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        if request.adapter is None:
            return
        if request.adapter in self.residency.entries:
            self.residency.use(request.adapter)
            return
        if request.adapter_dir is None:
            raise OperationError(grpc.StatusCode.NOT_FOUND, f"model_path {request.adapter!r}: not loaded")
        spec, pairs = read_adapter(Path(request.adapter_dir), self.layers, self.device)
        self.residency.add_snapshot(request.adapter, spec, _frozen(pairs), Path(request.adapter_dir), None)

    def _read_snapshot(self, directory: Path) -> dict[str, LoraPair]:
        return _frozen(read_adapter(directory, self.layers, self.device)[1])

    # -- sampling --------------------------------------------------------------------

    def _start_generation(self, items: list[ops.WorkItem], private: bool) -> list[object]:
        """Queues the items' samples for the decoder. `private`: they decode across cycles, so
        they sample copies of the weights they read: what later cycles do to those weights, or
        where residency moves them, cannot reach a generation."""
        copies: dict[str, tuple[str, int]] = {}
        for item in items:
            name = item.operation.adapter
            weights, copy_bytes = name, 0
            if private and name is not None:
                weights, copy_bytes = copies[name] = copies.get(name) or self._generation_copy(name)
            # Prompts are reused only with weights that never change: the base model's and snapshots'.
            reusable = name is None or self.residency.has_snapshot(name)
            self.decoder.submit(item, weights, copy_bytes, reuse_key=(name or "") if reusable else None)
        return [_GENERATING] * len(items)

    def _generation_copy(self, name: str) -> tuple[str, int]:
        """A copy of `name`'s weights for generations, and its bytes: a run's, fresh (its weights
        move on with every step); a snapshot's, one shared by every generation that reads it until
        the last one is answered or the snapshot changes."""
        snapshot = self.residency.has_snapshot(name)
        if snapshot and (shared := self._snapshot_copies.get(name)) is not None:
            return shared
        copy = f"{name}#generation-{next(self._generation_ids)}"
        pairs = {
            path: LoraPair(pair.A.detach().clone(), pair.B.detach().clone(), pair.scaling)
            for path, layer in self.layers.items()
            if (pair := layer.adapters.get(name)) is not None
        }
        self._register(copy, pairs)
        made = copy, sum(pair.A.nbytes + pair.B.nbytes for pair in pairs.values())
        if snapshot:
            self._snapshot_copies[name] = made
        return made

    def _release_copy(self, copy: str) -> None:
        """No request reads the weights copy any more."""
        self._unregister(copy)
        self._snapshot_copies = {name: kept for name, kept in self._snapshot_copies.items() if kept[0] != copy}


_GENERATING = object()
"""A sample's output while its generation runs: its outcome comes with a later cycle's."""


def _frozen(pairs: dict[str, LoraPair]) -> dict[str, LoraPair]:
    """Sampler weights: read, never trained."""
    for pair in pairs.values():
        pair.A.requires_grad_(False)
        pair.B.requires_grad_(False)
    return pairs
