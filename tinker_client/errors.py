"""Typed errors, one per kind of failure, each with the server's message and the request id."""

from __future__ import annotations

import grpc


class TinkerError(Exception):
    """Base of every error this SDK raises."""


class APIError(TinkerError):
    def __init__(self, message: str, *, code: grpc.StatusCode, request_id: str | None = None) -> None:
        super().__init__(f"{message} (status {code.name}" + (f", request {request_id})" if request_id else ")"))
        self.message = message
        self.code = code
        self.request_id = request_id


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The server did not answer in time."""


class APIStatusError(APIError):
    """The server answered with an error status."""


class BadRequestError(APIStatusError):
    """The request is invalid; the message names the field."""


class AuthenticationError(APIStatusError):
    """No valid API key."""


class PermissionDeniedError(APIStatusError):
    """The API key may not access this resource."""


class NotFoundError(APIStatusError):
    """No such model, checkpoint or future."""


class ConflictError(APIStatusError):
    """The resource already exists."""


class RateLimitError(APIStatusError):
    """Too many queued requests or too large a request; back off and retry."""


class InternalServerError(APIStatusError):
    """The server failed while running the request."""


_BY_CODE: dict[grpc.StatusCode, type[APIError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: BadRequestError,
    grpc.StatusCode.OUT_OF_RANGE: BadRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: APIConnectionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: APITimeoutError,
}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_for_status(code: grpc.StatusCode | int, message: str, request_id: str | None = None) -> APIError:
    if isinstance(code, int):
        code = _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, InternalServerError)(message, code=code, request_id=request_id)


def error_from_rpc(error: grpc.aio.AioRpcError) -> APIError:
    return error_for_status(error.code(), error.details() or "")
