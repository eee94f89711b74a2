"""The server's interceptor stack: request ids and access logs, then API keys.

Each call gets an id (the client's `x-request-id` metadata, or a new one) that appears in
the access log line and in the call's trailing metadata, so a client's report can be
matched to the server's log; an exception no handler expected becomes INTERNAL with that
id. Then the caller's API key is checked and its owner set for the handler.
"""

from __future__ import annotations

import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tinker_server.api.requests import RequestError
from tinker_server.auth import PUBLIC_SERVICES, ApiKeys, current_owner

log = logging.getLogger("tinker_server.access")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


def rewrap(
    handler: grpc.RpcMethodHandler,
    before: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    after: Callable[[grpc.aio.ServicerContext, float, BaseException | None], Awaitable[None]],
) -> grpc.RpcMethodHandler:
    """The same handler, with `before` run first and `after` run last (with the error, if any)."""

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, error = time.perf_counter(), None
            try:
                await before(context)
                return await behavior(request, context)
            except Exception as caught:
                error = caught
                raise
            finally:
                await after(context, started, error)

        return wrapped

    def streaming(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, error = time.perf_counter(), None
            try:
                await before(context)
                responses = behavior(request, context)
                if inspect.isasyncgen(responses):
                    async for response in responses:
                        yield response
                else:  # a handler that writes with context.write() (e.g. grpc's health Watch)
                    await responses
            except Exception as caught:
                error = caught
                raise
            finally:
                await after(context, started, error)

        return wrapped

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **codec)


async def _nothing(*_: Any) -> None:
    return None


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        request_id = str(dict(details.invocation_metadata or ()).get("x-request-id") or uuid.uuid4().hex[:16])

        async def after(context: grpc.aio.ServicerContext, started: float, error: BaseException | None) -> None:
            context.set_trailing_metadata((("x-request-id", request_id),))
            elapsed_ms = (time.perf_counter() - started) * 1e3
            if isinstance(error, RequestError):  # a handler's clear refusal: its status and message
                await context.abort(error.code, str(error))
            if error is not None and not isinstance(error, grpc.aio.AbortError):
                log.error("%s [%s] failed after %.1f ms", details.method, request_id, elapsed_ms, exc_info=error)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id}): {error}")
            code = context.code() or grpc.StatusCode.OK
            log.info("%s [%s] %s in %.1f ms", details.method, request_id, getattr(code, "name", code), elapsed_ms)

        return rewrap(handler, _nothing, after)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs each handler with `current_owner` set from the caller's API key, or refuses it."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_SERVICES):
            return handler
        owner = self._keys.owner(details.invocation_metadata)

        async def before(context: grpc.aio.ServicerContext) -> None:
            if owner is None:
                log.warning("rejected %s: missing or unknown API key", details.method)
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (authorization: Bearer <key>)"
                )
            current_owner.set(owner)

        return rewrap(handler, before, _nothing)
