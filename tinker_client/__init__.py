"""Python SDK of the self-hosted Tinker service: the public Tinker SDK's names, over gRPC.

>>> from tinker_client import ServiceClient, types
>>> training = ServiceClient(base_url="localhost:50051").create_lora_training_client("embedded/tiny-llama")
"""

from tinker_client import types
from tinker_client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    TinkerError,
)
from tinker_client.futures import APIFuture
from tinker_client.rest_client import RestClient
from tinker_client.sampling_client import SamplingClient
from tinker_client.service_client import ServiceClient
from tinker_client.training_client import TrainingClient
from tinker_client.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "InternalServerError",
    "ModelInput",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RestClient",
    "SampleResponse",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TinkerError",
    "TrainingClient",
    "types",
]
