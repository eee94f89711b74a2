"""Typed errors with the Tinker SDK's classes and attributes, one per kind of failure.

A request the server rejected before queueing it raises the status class for its gRPC code
(e.g. BadRequestError). A request that was acked and then failed raises the same class,
also an instance of RequestFailedError (as the hosted SDK raises for a failed future).
"""

from __future__ import annotations

import enum
from functools import cache

import grpc


class RequestErrorCategory(enum.StrEnum):
    Unknown = enum.auto()
    Server = enum.auto()
    User = enum.auto()


class TinkerError(Exception):
    """Base of every error this SDK raises."""


class APIError(TinkerError):
    """An error the server (or the connection to it) reported.

    `code`: the gRPC status; `status_code`: its HTTP equivalent (as the hosted service
    answers); `body`: {"code", "message"}; `request_id`: the SDK's id of the request.
    """

    status_code: int | None = None

    def __init__(self, message: str, *, code: grpc.StatusCode, request_id: str | None = None) -> None:
        super().__init__(f"{message} (status {code.name}" + (f", request {request_id})" if request_id else ")"))
        self.message = message
        self.code = code
        self.request_id = request_id
        self.status_code = _HTTP_STATUS.get(code, type(self).status_code)
        self.body: object | None = {"code": code.name, "message": message}
        self.request = None
        """The hosted SDK's httpx request; there is none over gRPC."""
        self.response = None


class APIResponseValidationError(APIError):
    """The server's answer did not have the expected form."""


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The server did not answer in time."""


class APIStatusError(APIError):
    """The server answered with an error status."""


class BadRequestError(APIStatusError):
    """The request is invalid; the message names the field."""

    status_code = 400


class AuthenticationError(APIStatusError):
    """No valid API key."""

    status_code = 401


class BillingError(APIStatusError):
    """The hosted service's billing error; a self-hosted server never raises it."""

    status_code = 402


class PermissionDeniedError(APIStatusError):
    """The API key may not access this resource."""

    status_code = 403


class NotFoundError(APIStatusError):
    """No such model, checkpoint or future."""

    status_code = 404


class ConflictError(APIStatusError):
    """The resource already exists."""

    status_code = 409


class UnprocessableEntityError(APIStatusError):
    """The request is well formed but cannot be done in the resource's state."""

    status_code = 422


class RateLimitError(APIStatusError):
    """Too many queued requests or too large a request; back off and retry."""

    status_code = 429


class InternalServerError(APIStatusError):
    """The server failed while running the request."""

    status_code = 500


class UnsupportedFeatureError(TinkerError, NotImplementedError):
    """A Tinker feature that has no meaning on a self-hosted server (billing, console, ...)."""


class RequestFailedError(TinkerError):
    """A request the server accepted (acked) that then failed."""

    def __init__(
        self, message: str, request_id: str = "", category: RequestErrorCategory = RequestErrorCategory.Unknown
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = category


_BY_CODE: dict[grpc.StatusCode, type[APIError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.OUT_OF_RANGE: BadRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: BadRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
    grpc.StatusCode.UNAVAILABLE: APIConnectionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: APITimeoutError,
}
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_USER_CODES = {code for code, status in _HTTP_STATUS.items() if 400 <= status < 500}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


@cache
def _failed(status_class: type[APIError]) -> type[APIError]:
    """`status_class` that is also a RequestFailedError, for failures after the ack."""
    return type(status_class.__name__, (status_class, RequestFailedError), {"__module__": __name__})


def error_for_status(
    code: grpc.StatusCode | int, message: str, request_id: str | None = None, *, acked: bool = False
) -> APIError:
    if isinstance(code, int):
        code = _CODES_BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    status_class = _BY_CODE.get(code, InternalServerError)
    if not acked:
        return status_class(message, code=code, request_id=request_id)
    error = _failed(status_class)(message, code=code, request_id=request_id)
    error.category = RequestErrorCategory.User if code in _USER_CODES else RequestErrorCategory.Server
    return error


def error_from_rpc(error: grpc.aio.AioRpcError) -> APIError:
    return error_for_status(error.code(), error.details() or "")
