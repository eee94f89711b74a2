"""The TinkerService servicer: translates between proto messages and the scheduler.

One Session stream per client: a reader task validates and queues each request and
acks it; results are written back on the same stream as they complete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from tinker_rpc.v1 import service_pb2, service_pb2_grpc, training_pb2
from tinker_server import ops
from tinker_server.api.requests import Limits, ParsedRequest, RequestError, RequestParser
from tinker_server.api.responses import error_result, outcome_result
from tinker_server.runs import RunRegistry
from tinker_server.scheduler import Scheduler

log = logging.getLogger(__name__)


class TinkerServicer(service_pb2_grpc.TinkerServiceServicer):
    def __init__(
        self,
        model: ops.ModelInfo,
        registry: RunRegistry,
        parser: RequestParser,
        scheduler: Scheduler,
        limits: Limits,
    ) -> None:
        self._model = model
        self._registry = registry
        self._parser = parser
        self._scheduler = scheduler
        self._limits = limits

    # -- the session stream ----------------------------------------------------------

    async def Session(
        self, request_iterator: AsyncIterator[service_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.SessionResponse]:
        outbox: asyncio.Queue[service_pb2.SessionResponse | None] = asyncio.Queue()
        pending: set[str] = set()  # request ids acked but not yet answered
        seen: set[str] = set()
        reader_done = asyncio.Event()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    self._accept(request, seen, pending, outbox)
            finally:
                reader_done.set()
                outbox.put_nowait(None)  # wake the writer to re-check whether it is done

        reader = asyncio.create_task(read())
        try:
            while not (reader_done.is_set() and not pending):
                response = await outbox.get()
                if response is not None:
                    yield response
        finally:
            reader.cancel()

    def _accept(
        self,
        request: service_pb2.SessionRequest,
        seen: set[str],
        pending: set[str],
        outbox: asyncio.Queue[service_pb2.SessionResponse | None],
    ) -> None:
        request_id = request.request_id
        try:
            if not request_id:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request_id: required")
            if request_id in seen:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"request_id {request_id!r}: already used on this stream"
                )
            parsed = self._parser.parse(request)
        except RequestError as error:
            log.info("rejected %s: %s", request_id or "<no id>", error)
            outbox.put_nowait(
                service_pb2.SessionResponse(request_id=request_id, result=error_result(error.code.value[0], str(error)))
            )
            return
        seen.add(request_id)
        ticket = self._submit(parsed)
        pending.add(request_id)
        outbox.put_nowait(
            service_pb2.SessionResponse(
                request_id=request_id, ack=service_pb2.Ack(future_id=ticket.future_id, seq=ticket.seq)
            )
        )

        def deliver(done: asyncio.Future[ops.Outcome]) -> None:
            pending.discard(request_id)
            outbox.put_nowait(service_pb2.SessionResponse(request_id=request_id, result=outcome_result(done.result())))

        ticket.outcome.add_done_callback(deliver)

    def _submit(self, parsed: ParsedRequest):
        """Queues the request and keeps the registry in step with its outcome."""
        if parsed.run is not None:
            self._registry.add_run(parsed.run)
        if parsed.reserved_sampler_path is not None:
            self._registry.reserve_sampler_path(parsed.reserved_sampler_path)
        ticket = self._scheduler.submit(parsed.queue_key, parsed.item)

        def undo_on_error(done: asyncio.Future[ops.Outcome]) -> None:
            if done.result().error is None:
                return
            if parsed.run is not None:
                self._registry.remove_run(parsed.run.model_id)
            if parsed.reserved_sampler_path is not None:
                self._registry.release_sampler_path(parsed.reserved_sampler_path)

        ticket.outcome.add_done_callback(undo_on_error)
        return ticket

    # -- unary calls -----------------------------------------------------------------

    async def GetServerCapabilities(
        self, request: service_pb2.GetServerCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetServerCapabilitiesResponse:
        model = service_pb2.SupportedModel(
            model_name=self._model.name,
            max_context_length=self._model.max_context_length,
            vocab_size=self._model.vocab_size,
            trainable=True,
            sampleable=True,
        )
        return service_pb2.GetServerCapabilitiesResponse(
            supported_models=[model],
            max_lora_rank=self._limits.max_lora_rank,
            max_message_bytes=self._limits.max_message_bytes,
        )

    async def GetInfo(
        self, request: service_pb2.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetInfoResponse:
        run = self._registry.run(request.model_id)
        if run is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model_id {request.model_id!r}: no such training run")
        lora = run.lora
        return service_pb2.GetInfoResponse(
            model_id=run.model_id,
            model_name=run.base_model,
            arch=self._model.arch,
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
        )

    async def GetTokenizer(
        self, request: service_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.GetTokenizerResponse:
        if request.base_model != self._model.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"base_model {request.base_model!r} is not served here; served: [{self._model.name!r}]",
            )
        return service_pb2.GetTokenizerResponse(files=self._model.tokenizer_files)
