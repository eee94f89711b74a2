"""Between the servicers and the scheduler: queue parsed requests, and keep the durable
record (runs, checkpoints, futures' results, sampled sequences) in step with what the worker did."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from tinker_rpc.v1 import service_pb2
from tinker_server import metrics, ops
from tinker_server.api.provenance import SEQUENCE_TTL_SECONDS
from tinker_server.api.requests import Limits, ParsedRequest, RequestError, sampler_queue_prefix
from tinker_server.api.responses import error_result, outcome_result
from tinker_server.runs import Runs, rollback_message
from tinker_server.store import Checkpoint, CheckpointPath, RecordedSequence

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from tinker_server.fleet import Fleet

log = logging.getLogger(__name__)


@dataclass
class Submitted:
    future_id: str
    seq: int
    owner: str
    result: asyncio.Future[service_pb2.Result]
    size: int = 0
    """Bytes of the request, held against its owner's quota until it is answered."""


class Dispatcher:
    def __init__(self, fleet: Fleet, runs: Runs, limits: Limits, result_retention_seconds: float) -> None:
        self._fleet = fleet
        self._runs = runs
        self._limits = limits
        self._tasks: set[asyncio.Task[None]] = set()
        self.retention_seconds = result_retention_seconds
        self._inflight: dict[str, Submitted] = {}  # by future_id, until the result is stored
        self._queued: dict[str, tuple[int, int]] = {}  # owner -> (requests, bytes) in _inflight
        self._stored = runs.store.result_counts()  # owner -> results kept
        self.draining = False
        """Set at shutdown: new requests are refused, queued ones still run."""

    def check_accepting(self) -> None:
        """Raises UNAVAILABLE once the server is shutting down."""
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; send this elsewhere")

    def _check_queue_quotas(self, owner: str, size: int) -> None:
        """One owner's flood waits in their own queues, within their own quota, never in others'."""
        count, queued_bytes = self._queued.get(owner, (0, 0))
        limits = self._limits
        if count >= limits.max_queued_requests_per_owner:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"you have {count} requests queued, the quota per owner (--max-queued-requests-per-owner); "
                "wait for results, then send more",
            )
        if self._stored[owner] >= limits.max_stored_results_per_owner:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"you have {self._stored[owner]} results kept for resuming, the quota per owner "
                "(--max-stored-results-per-owner); they expire after --result-retention-seconds",
            )
        if queued_bytes + size > limits.max_queued_bytes_per_owner:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this request ({size} bytes) would take your queued requests to {queued_bytes + size} bytes, beyond "
                f"the quota per owner (--max-queued-bytes-per-owner {limits.max_queued_bytes_per_owner}); "
                "wait for results, or send smaller batches",
            )

    def previous(self, owner: str, idempotency_key: str) -> tuple[str, int] | None:
        """(future_id, seq) of the request an idempotency key already named, if any: the
        request is being resent after a reconnect (or a restart)."""
        return self._runs.store.accepted(owner, idempotency_key) if idempotency_key else None

    def answer_lost_requests(self) -> None:
        """At start: requests a crash cut short get their result, an error saying so, so that a
        client resending or resuming them learns what happened instead of "unknown"."""
        expires = time.time() + self.retention_seconds
        for future_id, owner in self._runs.store.unanswered():
            message = (
                "the server stopped (a crash or a kill) before this request finished: it did not complete, "
                "and the unsaved state of the run it was for is gone; continue from the run's last checkpoint"
            )
            result = error_result(grpc.StatusCode.ABORTED.value[0], message, future_id)
            self._runs.store.put_result(future_id, owner, result.SerializeToString(), expires)
            self._stored[owner] += 1

    async def result_of(self, future_id: str, owner: str) -> service_pb2.Result | None:
        """The Result of an acked request, waiting for it if it is still running; None if
        unknown, expired, or another owner's."""
        submitted = self._inflight.get(future_id)
        if submitted is not None:
            return await asyncio.shield(submitted.result) if submitted.owner == owner else None
        stored = self._runs.store.result(future_id)
        if stored is None or stored[0] != owner or stored[2] <= time.time():
            return None
        return service_pb2.Result.FromString(stored[1])

    def submit(
        self, parsed: ParsedRequest, owner: str, idempotency_key: str = "", internal: bool = False, size: int = 0
    ) -> Submitted:
        """Queues a request (`size` bytes). A client's is checked against its owner's quotas and
        recorded first (durably: its seq, its idempotency key); the server's own (`internal`) take
        no place in the order clients see."""
        future_id = uuid.uuid4().hex
        seq = 0
        home = self._fleet.choose(parsed.run.base_model) if parsed.run is not None else None
        if not internal:
            self._check_queue_quotas(owner, size)
            try:
                seq = self._runs.store.accept(future_id, owner, idempotency_key, parsed.queue_key)
            except sqlite3.Error as error:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, f"the server could not record this request ({error}); it did not run"
                ) from error
        parsed.item.future_id = future_id
        run_id = ops.run_of(parsed.item)
        if run_id and parsed.run is None and not self._runs.is_live(run_id):
            self._revive(run_id)
        if parsed.run is not None:
            self._runs.add_live(dataclasses.replace(parsed.run, owner=owner))
            self._fleet.place(parsed.run.model_id, home)
        if parsed.checkpoint is not None:
            self._runs.reserve(parsed.checkpoint)
        if parsed.sequence_ids:
            self._runs.store.touch_sampled_sequences(parsed.sequence_ids, time.time())
        ticket = self._fleet.submit(parsed.queue_key, parsed.item, parsed.base_model)
        result: asyncio.Future[service_pb2.Result] = asyncio.get_running_loop().create_future()
        submitted = Submitted(future_id, seq, owner, result, size)
        self._inflight[future_id] = submitted
        count, queued_bytes = self._queued.get(owner, (0, 0))
        self._queued[owner] = (count + 1, queued_bytes + size)

        def settle(done: asyncio.Future[ops.Outcome]) -> None:
            try:
                message = self._settle(ticket.future_id, parsed, done.result(), owner)
            except Exception as error:  # the client is answered whatever goes wrong here
                log.exception("recording the result of %s failed", ticket.future_id)
                message = error_result(
                    grpc.StatusCode.INTERNAL.value[0],
                    f"the request ran, but the server could not record its result ({type(error).__name__}: "
                    f"{error}); what it did to the run stands: check the run (get_info, a forward) before going on",
                    ticket.future_id,
                )
            finally:
                del self._inflight[ticket.future_id]
                count, queued_bytes = self._queued.pop(owner)
                if count > 1:
                    self._queued[owner] = (count - 1, queued_bytes - submitted.size)
            status = status_code(message.error.code).name if message.HasField("error") else "OK"
            metrics.REQUESTS.labels(type(parsed.item.operation).__name__, status).inc()
            result.set_result(message)

        ticket.outcome.add_done_callback(settle)
        return submitted

    def _settle(self, future_id: str, parsed: ParsedRequest, outcome: ops.Outcome, owner: str) -> service_pb2.Result:
        """The durable record follows the outcome; the result is stored before it is sent."""
        self._record(parsed, outcome, owner)
        message = outcome_result(outcome)
        if parsed.sampler is not None and outcome.error is None:
            message.save_weights_for_sampler.sampler_id = self._new_sampler(parsed, owner)
        expires = time.time() + self.retention_seconds
        self._runs.store.put_result(future_id, owner, message.SerializeToString(), expires)
        self._stored[owner] += 1
        return message

    def _record(self, parsed: ParsedRequest, outcome: ops.Outcome, owner: str) -> None:
        """The store follows the outcome: failed creations vanish, saved checkpoints appear,
        sampled sequences are recorded when asked (before the client sees their ids)."""
        now = time.time()
        if parsed.checkpoint is not None:
            self._runs.release(parsed.checkpoint)
        if outcome.error is not None:
            if parsed.run is not None:
                self._runs.drop(parsed.run.model_id)
            return
        payload = outcome.result
        model_id = parsed.item.model_id
        step = self._record_run_state(parsed, payload, now) if model_id else 0
        if isinstance(payload, ops.SaveCheckpointResult) and parsed.checkpoint is not None:
            if parsed.ephemeral:
                self._runs.add_ephemeral(parsed.checkpoint)
                self.release_replaced_snapshots()
            expires = None if parsed.ttl_seconds is None else now + parsed.ttl_seconds
            metadata = parsed.checkpoint_metadata or {}
            checkpoint = Checkpoint(parsed.checkpoint, now, payload.size_bytes, expires, False, metadata, step)
            self._runs.store.put_checkpoint(checkpoint)
        if isinstance(payload, ops.SampleResult) and parsed.record_stability_info:
            prompt = parsed.item.operation.prompt
            sequences = [RecordedSequence(s.sequence_id, prompt, s.tokens, s.logprobs) for s in payload.sequences]
            self._runs.store.put_sampled_sequences(owner, sequences, now)
            self._runs.store.cap_sampled_sequences(owner, self._limits.max_recorded_sequences_per_owner, now)

    def _record_run_state(self, parsed: ParsedRequest, payload: ops.OpResult, now: float) -> int:
        """What a crash would take the run back to (its restore point) and whether it would lose
        work (steps since, or gradients no step consumed); returns the run's optimizer steps so far
        (a checkpoint it saves is at that step)."""
        model_id = parsed.item.model_id
        if isinstance(payload, ops.CreateAdapterResult):
            self._runs.store.set_lora(model_id, payload.lora, list(payload.trained_modules))
            self._runs.note_built(model_id)
        elif isinstance(payload, ops.LoadStateResult):
            self._runs.lift_fence(model_id)  # the client acknowledged a rollback, if there was one
            self._runs.store.forget_steps_from(model_id, parsed.restore.step)
        saved = isinstance(payload, ops.SaveCheckpointResult)
        step = self._runs.store.run(model_id).steps if saved else 0
        if parsed.restore is not None:
            self._runs.store.set_restore_point(
                model_id, dataclasses.replace(parsed.restore, step=step) if saved else parsed.restore
            )
        stepped = isinstance(payload, ops.OptimStepResult)
        gradients = None
        if isinstance(payload, ops.ForwardBackwardResult) and parsed.item.operation.backward:
            gradients = True
        elif stepped or isinstance(payload, ops.CreateAdapterResult | ops.LoadStateResult):
            gradients = False  # consumed, or a fresh adapter
        steps = self._runs.store.touch_run(model_id, now, steps_applied=int(stepped), gradients=gradients)
        self._record_step_metrics(model_id, parsed.item.operation, payload, steps)
        return step

    def _record_step_metrics(self, model_id: str, operation: ops.Operation, payload: ops.OpResult, steps: int) -> None:
        """The console's curves: a backward pass adds to the step in progress (the run's `steps`th,
        counting from 0), an optimizer step completes it."""
        store = self._runs.store
        if isinstance(payload, ops.ForwardBackwardResult) and operation.backward:
            weight = sum(_loss_weight(datum) for datum in operation.data)
            tokens = sum(len(datum.tokens) for datum in operation.data)
            store.add_gradients(model_id, steps, payload.metrics["loss:sum"], weight, tokens)
        elif isinstance(payload, ops.OptimStepResult):
            limit = self._limits.max_metric_steps_per_run
            grad_norm = payload.metrics.get("grad_norm")  # (a worker that reports none leaves a gap)
            store.add_optimizer_step(model_id, steps - 1, operation.adam.learning_rate, grad_norm, limit)

    def _revive(self, model_id: str) -> None:
        """A run of an earlier server process: rebuilt at its restore point, ahead of the request
        that names it; fenced if it had moved on from there (the restart lost that work)."""
        run = self._runs.store.run(model_id)
        self._runs.revive(run)
        if run.diverged:
            self._runs.fence(model_id, rollback_message(run, "the server restarted"))
        self._fleet.place_revived(run)
        self._fleet.rebuild(run, "the server restarted")

    def gate(self, items: list[ops.WorkItem]) -> list[ops.OpError | None]:
        """A run a worker crash took back fails every request with where it went, until its
        load_state (which acknowledges: what follows it in the same cycle runs too)."""
        acknowledged: set[str] = set()
        refusals: list[ops.OpError | None] = []
        for item in items:
            run = ops.run_of(item)
            rebuild = isinstance(item.operation, ops.CreateAdapter)  # a revived run's, ahead of its requests
            fence = self._runs.fence_of(run) if run and run not in acknowledged and not rebuild else None
            if fence is not None and isinstance(item.operation, ops.LoadState):
                acknowledged.add(run)
                fence = None
            refusals.append(None if fence is None else ops.OpError(grpc.StatusCode.FAILED_PRECONDITION.value[0], fence))
        return refusals

    def _new_sampler(self, parsed: ParsedRequest, owner: str) -> str:
        """Registers the sampler a save asked for, held before any later save can release it."""
        new, path = parsed.sampler, str(parsed.checkpoint)
        return self._runs.new_sampler(owner, new.session_id, new.base_model, path, new.record_stability_info).sampler_id

    # -- checkpoint lifecycle --------------------------------------------------------

    async def delete_checkpoint(self, path: CheckpointPath) -> None:
        """Deleted in the run's order (after any save queued before it), then forgotten."""
        directory = str(self._runs.directory(path))
        item = ops.WorkItem("", path.model_id, ops.DeleteCheckpoint(str(path), directory))
        outcome = await self._fleet.submit(path.model_id, item).outcome
        if outcome.error is not None:
            raise RequestError(status_code(outcome.error.code), outcome.error.message)
        self._runs.store.delete_checkpoint(path)
        self._runs.forget_samplers(str(path))
        self._runs.store.forget_queues(sampler_queue_prefix(str(path)))

    def release_replaced_snapshots(self) -> None:
        """Deletes the unnamed snapshots that newer ones replaced and no sampling client holds."""
        for path in self._runs.replaced_snapshots():
            self._in_background(self.delete_checkpoint(path), f"deleting {path}")

    def close_run(self, model_id: str) -> None:
        """Takes no new request of the run and frees its adapter once everything queued for it
        ran (in the background: the caller waits for none of it); its checkpoints stay."""
        self._runs.begin_close(model_id)
        self._in_background(self._unload(model_id), f"unloading {model_id}")

    def _in_background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # referenced until done: asyncio keeps only weak references
        task.add_done_callback(functools.partial(self._finished, what))

    def _finished(self, what: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.warning("%s failed: %s", what, error)

    async def _unload(self, model_id: str) -> None:
        item = ops.WorkItem("", model_id, ops.Unload())
        outcome = await self._fleet.submit(model_id, item).outcome
        self._runs.close(model_id)  # either way: an unload lost to a crash was done by the crash
        if outcome.error is not None:
            raise RequestError(status_code(outcome.error.code), outcome.error.message)

    async def sweep(self) -> None:
        """Deletes expired checkpoints and forgets expired results and sampled sequences."""
        now = time.time()
        for checkpoint in self._runs.store.expired_checkpoints(now):
            log.info("checkpoint %s expired; deleting it", checkpoint.path)
            await self.delete_checkpoint(checkpoint.path)
        self._stored -= self._runs.store.purge_results(now)
        self._runs.store.purge_sampled_sequences(now - SEQUENCE_TTL_SECONDS, now)
        self._runs.store.purge_expired_sequence_ids(now - SEQUENCE_TTL_SECONDS)

    def discard_files(self, path: CheckpointPath) -> None:
        shutil.rmtree(self._runs.directory(path), ignore_errors=True)


def _loss_weight(datum: ops.DatumArrays) -> float:
    """The tokens a datum's loss counts: cross_entropy's weights, else one per target token."""
    weights = datum.loss_fn_inputs.get("weights")
    return float(weights.sum()) if weights is not None else float(len(datum.loss_fn_inputs["target_tokens"]))


def status_code(number: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == number), grpc.StatusCode.UNKNOWN)
