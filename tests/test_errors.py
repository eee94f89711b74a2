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


def test_errors_carry_tinkers_attributes_and_an_acked_failure_is_a_request_failed_error():
    rejected = errors.error_for_status(grpc.StatusCode.NOT_FOUND.value[0], "no such run", request_id="r1")
    assert rejected.status_code == 404 and rejected.body == {"code": "NOT_FOUND", "message": "no such run"}
    assert not isinstance(rejected, errors.RequestFailedError)
    failed = errors.error_for_status(grpc.StatusCode.INTERNAL.value[0], "worker died", "r2", acked=True)
    assert isinstance(failed, errors.InternalServerError) and isinstance(failed, errors.RequestFailedError)
    assert failed.category == errors.RequestErrorCategory.Server and failed.request_id == "r2"
    user = errors.error_for_status(grpc.StatusCode.INVALID_ARGUMENT.value[0], "bad", "r3", acked=True)
    assert user.category == errors.RequestErrorCategory.User and type(user).__name__ == "BadRequestError"
