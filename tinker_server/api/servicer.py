"""The TinkerService servicer: translates between proto messages and the scheduler.

One Session stream per client: a reader task validates and queues each request and
acks it; results are written back on the same stream as they complete.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import grpc

from tinker_rpc.v1 import service_pb2, service_pb2_grpc, training_pb2
from tinker_server import metrics, ops
from tinker_server.api.dispatch import Dispatcher
from tinker_server.api.requests import Limits, RequestError, RequestParser
from tinker_server.api.responses import error_result
from tinker_server.auth import current_owner
from tinker_server.runs import Runs
from tinker_server.served import ServedModels
from tinker_server.store import Session
from tinker_wire.batches import BATCH_BYTES, take_queued

log = logging.getLogger(__name__)
SESSION_STATUSES = ("success", "errored", "interrupted")
SEEN_REQUEST_IDS = 100_000
"""How many recent request ids a stream remembers, to refuse one used twice."""
BATCHES_METADATA = ("tinker-session-batches", "1")
"""A client's ask for SessionResponse.batch on its stream."""


class TinkerServicer(service_pb2_grpc.TinkerServiceServicer):
    def __init__(
        self,
        served: ServedModels,
        runs: Runs,
        parser: RequestParser,
        dispatcher: Dispatcher,
        limits: Limits,
        residency: Callable[[], ops.ResidencyStats] = ops.ResidencyStats,
        console_url: str = "",
    ) -> None:
        self._residency = residency
        self._console_url = console_url
        self._served = served
        self._runs = runs
        self._parser = parser
        self._dispatcher = dispatcher
        self._limits = limits
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the session stream ----------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[service_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.SessionResponse]:
        await self._served.wait()  # requests sent while the worker loads wait for it
        outbox: asyncio.Queue[service_pb2.SessionResponse | None] = asyncio.Queue()
        pending: set[str] = set()  # request ids acked but not yet answered
        seen: dict[str, None] = {}  # request ids used on this stream: the latest SEEN_REQUEST_IDS, oldest first
        reader_done = asyncio.Event()
        unreadable: list[Exception] = []

        async def read() -> None:
            try:
                async for message in request_iterator:
                    batch = message.batch.requests if message.WhichOneof("request") == "batch" else (message,)
                    for request in batch:  # (a batch inside a batch is refused)
                        self._accept(request, seen, pending, outbox)
            except Exception as error:  # an undecodable message ends this stream, nothing else
                unreadable.append(error)
            finally:
                reader_done.set()
                outbox.put_nowait(None)  # wake the writer to re-check whether it is done

        batches = BATCHES_METADATA in (context.invocation_metadata() or ())
        budget = min(BATCH_BYTES, self._limits.max_message_bytes)  # what the server may send, too
        held_back: list[service_pb2.SessionResponse | None] = []  # what did not fit the last batch
        reader = asyncio.create_task(read())
        try:
            while not (reader_done.is_set() and outbox.empty() and not held_back and (unreadable or not pending)):
                response = held_back.pop() if held_back else await outbox.get()
                if response is None:  # a wake-up: check whether the stream is done
                    continue
                if not batches or len(together := take_queued(response, outbox, budget, held_back)) == 1:
                    yield response
                else:
                    yield service_pb2.SessionResponse(batch=service_pb2.SessionResponses(responses=together))
        finally:
            reader.cancel()
        if unreadable:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unreadable message on this stream ({unreadable[0]}); requests acked before it still "
                "complete: resume them by future_id",
            )

    def _accept(
        self,
        request: service_pb2.SessionRequest,
        seen: dict[str, None],
        pending: set[str],
        outbox: asyncio.Queue[service_pb2.SessionResponse | None],
    ) -> None:
        request_id = request.request_id
        owner = current_owner.get()
        try:
            if not request_id:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
            # Deduplicated first: the resend of a request already accepted is answered, draining or not.
            previous = self._dispatcher.previous(owner, request.idempotency_key)
            if previous is None and not request.HasField("resume"):
                self._dispatcher.check_accepting()
            if request_id in seen:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"request_id {request_id!r}: already used on this stream"
                )
            if len(pending) >= self._limits.max_inflight_requests:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{len(pending)} requests in flight on this stream, the limit; wait for results, then resend",
                )
            parsed = None if previous is not None or request.HasField("resume") else self._parser.parse(request)
            submitted = (
                None
                if parsed is None
                else self._dispatcher.submit(parsed, owner, request.idempotency_key, size=request.ByteSize())
            )
        except RequestError as error:
            log.info("rejected %s: %s", request_id or "<no id>", error)
            metrics.REQUESTS.labels(request.WhichOneof("request") or "none", error.code.name).inc()
            result = error_result(error.code.value[0], str(error))
            outbox.put_nowait(service_pb2.SessionResponse(request_id=request_id, result=result))
            return
        seen[request_id] = None
        if len(seen) > SEEN_REQUEST_IDS:  # a stream that lives for days must not grow without bound
            del seen[next(iter(seen))]
        pending.add(request_id)

        def deliver(result: service_pb2.Result) -> None:
            pending.discard(request_id)
            outbox.put_nowait(service_pb2.SessionResponse(request_id=request_id, result=result))

        if request.HasField("resume"):
            self._spawn(self._resume(request.resume.future_id, owner, deliver))
            return
        if previous is not None:  # a resend after a reconnect: the original answers, never run twice
            future_id, seq = previous
            outbox.put_nowait(
                service_pb2.SessionResponse(request_id=request_id, ack=service_pb2.Ack(future_id=future_id, seq=seq))
            )
            self._spawn(self._resume(future_id, owner, deliver))
            return
        ack = service_pb2.Ack(future_id=submitted.future_id, seq=submitted.seq)
        outbox.put_nowait(service_pb2.SessionResponse(request_id=request_id, ack=ack))
        submitted.result.add_done_callback(lambda done: deliver(done.result()))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """A background task, referenced until done (asyncio keeps only weak references)."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, future_id: str, owner: str, deliver: Callable[[service_pb2.Result], None]) -> None:
        result = await self._dispatcher.result_of(future_id, owner)
        if result is None:
            message = (
                f"resume.future_id {future_id!r}: no result retained (unknown, or expired after "
                f"{self._dispatcher.retention_seconds:g}s)"
            )
            result = error_result(grpc.StatusCode.NOT_FOUND.value[0], message)
        deliver(result)

    async def GetFutureResult(
        self, request: service_pb2.GetFutureResultRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetFutureResultResponse:
        result = await self._dispatcher.result_of(request.future_id, current_owner.get())
        if result is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"future_id {request.future_id!r}: no result retained (unknown, or expired after "
                f"{self._dispatcher.retention_seconds:g}s)",
            )
        return service_pb2.GetFutureResultResponse(result=result)

    # -- unary calls -----------------------------------------------------------------

    async def GetServerCapabilities(
        self, request: service_pb2.GetServerCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetServerCapabilitiesResponse:
        await self._served.wait()
        models = [
            service_pb2.SupportedModel(
                model_name=model.name,
                max_context_length=model.max_context_length,
                vocab_size=model.vocab_size,
                trainable=True,
                sampleable=True,
            )
            for model in self._served.all()
        ]
        return service_pb2.GetServerCapabilitiesResponse(
            supported_models=models,
            max_lora_rank=self._limits.max_lora_rank,
            max_message_bytes=self._limits.max_message_bytes,
            max_adapters=self._limits.max_adapters,
            max_inflight_requests=self._limits.max_inflight_requests,
            max_batch_tokens=self._limits.max_batch_tokens,
            max_num_samples=self._limits.max_num_samples,
            residency=service_pb2.AdapterResidency(**self._residency().counts()),
            console_url=self._console_url,
            session_batches=True,
        )

    async def GetInfo(
        self, request: service_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetInfoResponse:
        await self._served.wait()
        run = self._runs.owned_run(request.model_id, current_owner.get())
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model_id {request.model_id!r}: no such training run")
        model = self._served.get(run.base_model) or self._served.default
        lora = run.lora
        return service_pb2.GetInfoResponse(
            model_id=run.model_id,
            model_name=run.base_model,
            arch=model.arch,
            tokenizer_id=run.base_model,
            is_lora=True,
            lora_rank=lora.rank,
            lora_config=training_pb2.LoraConfig(
                rank=lora.rank,
                seed=lora.seed,
                train_mlp=lora.train_mlp,
                train_attn=lora.train_attn,
                train_unembed=lora.train_unembed,
            ),
            lora_alpha=lora.alpha,
            optimizer=training_pb2.OptimizerConfig(type=run.optimizer),
            trained_modules=run.trained_modules,
        )

    async def CreateSession(
        self, request: service_pb2.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.CreateSessionResponse:
        session_id = f"session-{secrets.token_hex(8)}"
        self._runs.store.add_session(
            Session(
                session_id,
                current_owner.get(),
                time.time(),
                request.project_id,
                request.display_name,
                dict(request.user_metadata),
            )
        )
        return service_pb2.CreateSessionResponse(session_id=session_id)

    async def CloseSession(
        self, request: service_pb2.CloseSessionRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.CloseSessionResponse:
        session = self._runs.store.session(request.session_id)
        if session is None or session.owner != current_owner.get():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session_id {request.session_id!r}: no such session")
        if request.status not in SESSION_STATUSES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"status {request.status!r}; expected one of {SESSION_STATUSES}"
            )
        self._runs.store.close_session(request.session_id, request.status, request.detail)
        for model_id in self._runs.store.session_runs(request.session_id):  # closing frees what it trained
            if self._runs.is_live(model_id):
                self._dispatcher.close_run(model_id)
            else:  # of an earlier server process, not brought back: it never will be now
                self._runs.store.close_run(model_id)
        return service_pb2.CloseSessionResponse()

    async def CreateSampler(
        self, request: service_pb2.CreateSamplerRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.CreateSamplerResponse:
        await self._served.wait()
        try:
            base_model, model_path = self._parser.sampler_source(request)
        except RequestError as error:
            await context.abort(error.code, str(error))
        owner, record = current_owner.get(), request.record_stability_info
        sampler = self._runs.new_sampler(owner, request.session_id, base_model, model_path, record)
        return service_pb2.CreateSamplerResponse(
            sampler_id=sampler.sampler_id, base_model=base_model, model_path=model_path
        )

    async def HoldSampler(
        self, request: service_pb2.HoldSamplerRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.HoldSamplerResponse:
        sampler = self._runs.owned_sampler(request.sampler_id, current_owner.get())
        if sampler is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"sampler_id {request.sampler_id!r}: no such sampler")
        self._runs.hold_sampler(sampler.sampler_id, sampler.model_path, +1 if request.held else -1)
        if not request.held:
            self._dispatcher.release_replaced_snapshots()
        return service_pb2.HoldSamplerResponse()

    async def GetTokenizer(
        self, request: service_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetTokenizerResponse:
        await self._served.wait()
        model = self._served.get(request.base_model)
        if model is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"base_model {request.base_model!r} is not served here; served: {self._served.names}",
            )
        return service_pb2.GetTokenizerResponse(files=model.tokenizer_files)
