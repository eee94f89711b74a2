"""gRPC statuses map to the SDK's typed errors, which keep the message and the request id."""

from __future__ import annotations

import grpc
import pytest

from tinker_client import errors


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.BadRequestError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.AuthenticationError),
        (grpc.StatusCode.ALREADY_EXISTS, errors.ConflictError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.RateLimitError),
        (grpc.StatusCode.INTERNAL, errors.InternalServerError),
        (grpc.StatusCode.UNKNOWN, errors.InternalServerError),
        (grpc.StatusCode.UNAVAILABLE, errors.APIConnectionError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.APITimeoutError),
    ],
)
def test_status_codes_map_to_typed_errors(code, error_type):
    error = errors.error_for_status(code.value[0], "data[0].model_input.tokens: bad", request_id="r7")
    assert type(error) is error_type
    assert isinstance(error, errors.TinkerError)
    assert error.code == code and error.request_id == "r7"
    assert "data[0].model_input.tokens: bad" in str(error) and "r7" in str(error)


def test_server_errors_and_connection_errors_are_distinct_families():
    assert issubclass(errors.BadRequestError, errors.APIStatusError)
    assert not issubclass(errors.APIConnectionError, errors.APIStatusError)
