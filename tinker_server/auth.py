"""API keys: `authorization: Bearer <key>` metadata, checked by an interceptor on every call.

Each key belongs to an owner; every run, checkpoint and future records its owner, and the
servicers read the caller's owner from `current_owner`. Other owners' resources answer
NOT_FOUND, so their existence does not leak.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

ANONYMOUS = ""
current_owner: contextvars.ContextVar[str] = contextvars.ContextVar("current_owner", default=ANONYMOUS)
# Standard services that load balancers and tools call without a key.
PUBLIC_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class ApiKeys:
    """key -> owner; `open` serves everyone as the anonymous owner."""

    owners: dict[str, str]
    open: bool = False

    @classmethod
    def load(cls, keys_file: Path | None, keys_env: str | None, allow_unauthenticated: bool) -> ApiKeys:
        """Keys from a file ('KEY OWNER' per line, # comments) and/or 'KEY=OWNER,...'."""
        owners: dict[str, str] = {}
        if keys_file is not None:
            for number, line in enumerate(keys_file.read_text().splitlines(), start=1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{keys_file}:{number}: expected 'KEY OWNER'")
                owners[parts[0]] = parts[1]
        for entry in filter(None, (keys_env or "").split(",")):
            key, separator, owner = entry.strip().partition("=")
            if not separator or not key or not owner:
                raise ValueError("TINKER_API_KEYS: expected 'KEY=OWNER' entries separated by commas")
            owners[key] = owner
        if not owners and not allow_unauthenticated:
            raise ValueError(
                "no API keys configured: pass --api-keys-file, set TINKER_API_KEYS, "
                "or run open with --allow-unauthenticated"
            )
        return cls(owners, open=not owners)

    def owner(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        if self.open:
            return ANONYMOUS
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            return None
        given = header.removeprefix("Bearer ").encode()
        # Constant-time comparison against every key: no timing hint about near misses.
        matches = [owner for key, owner in self.owners.items() if hmac.compare_digest(key.encode(), given)]
        return matches[0] if matches else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_SERVICES):
            return handler
        owner = self._keys.owner(details.invocation_metadata)
        return _with_owner(handler, owner, details.method)


def _with_owner(handler: grpc.RpcMethodHandler, owner: str | None, method: str) -> grpc.RpcMethodHandler:
    """The same handler, run with `current_owner` set, or refusing when the key is bad."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        if owner is None:
            log.warning("rejected %s: missing or unknown API key", method)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (authorization: Bearer <key>)"
            )
        current_owner.set(owner)

    def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await behavior(request, context)

        return wrapped

    def streaming(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in behavior(request, context):
                yield response

        return wrapped

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **codec)
