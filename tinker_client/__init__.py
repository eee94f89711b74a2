"""Python SDK of the self-hosted Tinker service: the public Tinker SDK's (0.38) names, over gRPC.

>>> from tinker_client import ServiceClient, types
>>> service = ServiceClient(base_url="localhost:50051")
>>> training = service.create_lora_training_client("embedded/tiny-llama").result()

Code written for `tinker` runs unchanged through `python -m tinker_client.as_tinker`.
"""

from importlib.metadata import PackageNotFoundError, version

from tinker_client import types
from tinker_client.admin_client import AdminClient
from tinker_client.custom_loss import LossHandle, PerDatumLossFn
from tinker_client.errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    BillingError,
    ConflictError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestFailedError,
    TinkerError,
    UnprocessableEntityError,
    UnsupportedFeatureError,
)
from tinker_client.futures import APIFuture
from tinker_client.rest_client import RestClient
from tinker_client.sampling_client import BackcompatSamplingClientFuture, SamplingClient
from tinker_client.service_client import ServiceClient
from tinker_client.training_client import BackcompatTrainingClientFuture, TrainingClient
from tinker_client.types import (
    AdamOptimizerConfig,
    AdamParams,
    Checkpoint,
    CheckpointType,
    Datum,
    DimuonOptimizerConfig,
    DimuonParams,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LoraConfig,
    ModelID,
    ModelInput,
    ModelInputChunk,
    OptimParams,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    PromptProvenanceSpan,
    SampledProvenanceSpan,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    StopReason,
    TensorData,
    TensorDtype,
    TrainingRun,
)

try:
    __version__ = version("tinker-grpc")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
__title__ = "tinker-grpc"


class ExperimentalWarning(UserWarning):
    """A feature that may change without a deprecation period."""


__all__ = [
    "APIConnectionError",
    "APIError",
    "APIFuture",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AdamOptimizerConfig",
    "AdamParams",
    "AdminClient",
    "AuthenticationError",
    "BackcompatSamplingClientFuture",
    "BackcompatTrainingClientFuture",
    "BadRequestError",
    "BillingError",
    "Checkpoint",
    "CheckpointType",
    "ConflictError",
    "Datum",
    "DimuonOptimizerConfig",
    "DimuonParams",
    "DmelChunk",
    "EncodedTextChunk",
    "ExperimentalWarning",
    "ForwardBackwardOutput",
    "InternalServerError",
    "LoraConfig",
    "LossHandle",
    "ModelID",
    "ModelInput",
    "ModelInputChunk",
    "NotFoundError",
    "OptimParams",
    "OptimStepResponse",
    "ParsedCheckpointTinkerPath",
    "PerDatumLossFn",
    "PermissionDeniedError",
    "PromptProvenanceSpan",
    "RateLimitError",
    "RequestFailedError",
    "RestClient",
    "SampleRequest",
    "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "TinkerError",
    "TrainingClient",
    "TrainingRun",
    "UnprocessableEntityError",
    "UnsupportedFeatureError",
    "types",
]
