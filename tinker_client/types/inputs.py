"""What the model reads: chunks, ModelInput, provenance spans, and the training Datum."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np

from tinker_client.types._coerce import token_array
from tinker_client.types.tensors import TensorData

ImageFormat: TypeAlias = Literal["png", "jpeg"]


@dataclass(frozen=True)
class EncodedTextChunk:
    """A run of token ids: a copy of those given, as Tinker's model makes one (callers build
    chunks from a buffer they then clear and refill, as the cookbook's RL data processing does)."""

    tokens: Sequence[int]
    type: Literal["encoded_text"] = "encoded_text"

    def __post_init__(self) -> None:
        tokens = self.tokens.copy() if isinstance(self.tokens, np.ndarray) else list(self.tokens)
        object.__setattr__(self, "tokens", tokens)  # (checked as they are converted: `token_array`)

    @property
    def length(self) -> int:
        return len(self.tokens)


def _expected_tokens(chunk: ImageChunk | ImageAssetPointerChunk) -> int:
    if chunk.expected_tokens is None:
        raise ValueError(f"{type(chunk).__name__}.expected_tokens must be set to compute the input's length")
    return chunk.expected_tokens


@dataclass(frozen=True)
class ImageChunk:
    """An image, inline (for vision-language base models)."""

    data: bytes
    format: ImageFormat
    expected_tokens: int | None = None
    """How many tokens the image takes, as the client expects (advisory)."""
    type: Literal["image"] = "image"

    @property
    def length(self) -> int:
        return _expected_tokens(self)


@dataclass(frozen=True)
class ImageAssetPointerChunk:
    """An image by path or URL (for vision-language base models)."""

    format: ImageFormat
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        return _expected_tokens(self)


@dataclass(frozen=True)
class DmelChunk:
    """Audio model tokens (Tinker's DMel format); no base model served here reads them."""

    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @property
    def length(self) -> int:
        raise ValueError("DmelChunk: audio input is not supported by this server")


ModelInputChunk: TypeAlias = EncodedTextChunk | ImageAssetPointerChunk | ImageChunk | DmelChunk


@dataclass(frozen=True)
class ModelInput:
    """The model's input, as a list of chunks.

    >>> ModelInput.from_ints([1, 2, 3]).append_int(4).to_ints()
    [1, 2, 3, 4]
    """

    chunks: list[ModelInputChunk]

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunks", list(self.chunks))  # the caller's list is theirs to change

    @classmethod
    def from_ints(cls, tokens: Sequence[int] | np.ndarray) -> ModelInput:
        """A numpy array stays one (no per-token Python objects on the way to the wire)."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    @property
    def is_text(self) -> bool:
        return all(isinstance(chunk, EncodedTextChunk) for chunk in self.chunks)

    def to_ints(self) -> list[int]:
        """All tokens; raises ValueError if the input holds non-text chunks."""
        return self.to_numpy().tolist()

    def to_numpy(self) -> np.ndarray:
        """All tokens as one int64 array; raises ValueError if the input holds non-text chunks."""
        if not self.is_text:
            kinds = [type(chunk).__name__ for chunk in self.chunks]
            raise ValueError(f"to_ints only supports inputs of EncodedTextChunks, got {kinds}")
        if not self.chunks:
            return np.empty(0, dtype=np.int64)
        return np.concatenate([token_array(chunk.tokens, "EncodedTextChunk.tokens") for chunk in self.chunks])

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk(tokens=[token]))


@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """Claims that the covered datum positions are positions [offset, offset + length) of
    the prompt of the sampling request that produced `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """Claims that the covered datum positions are positions [offset, offset + length) of
    the tokens sampled as `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


ProvenanceSpans: TypeAlias = list[PromptProvenanceSpan | SampledProvenanceSpan]
"""Consecutive runs tiling one Datum field; see `Datum.with_provenance`."""


def _check_span(span: PromptProvenanceSpan | SampledProvenanceSpan) -> None:
    name = type(span).__name__
    if not span.sequence_id:
        raise ValueError(f"{name}.sequence_id must be non-empty")
    if span.offset < 0 or span.length < 0:
        raise ValueError(f"{name}: offset {span.offset} and length {span.length} must be >= 0")


# Dtype of a loss input given as a plain list, by key (as Tinker does); others are float32.
_LIST_INPUT_DTYPES: dict[str, str] = {"target_tokens": "int64"}


def _as_tensor_data(key: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)
    if isinstance(value, list | tuple):
        array = np.asarray(value)
        if array.dtype == object:
            raise ValueError(f"loss_fn_inputs[{key!r}] must be a rectangular numeric array")
        return TensorData(array, dtype=_LIST_INPUT_DTYPES.get(key, "float32"))  # type: ignore[arg-type]
    raise TypeError(f"loss_fn_inputs[{key!r}]: unsupported value of type {type(value).__name__}")


@dataclass(frozen=True)
class Datum:
    """One training example. `loss_fn_inputs` values may be TensorData, numpy, torch or lists.

    >>> Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    """

    model_input: ModelInput
    loss_fn_inputs: Mapping[str, TensorData] = field(default_factory=dict)
    model_input_spans: ProvenanceSpans | None = None
    """Provenance of the input tokens: runs tiling `model_input`. Set with `with_provenance`."""
    loss_fn_input_spans: ProvenanceSpans | None = None
    """Provenance of the loss rows: runs tiling `loss_fn_inputs["target_tokens"]`."""

    def __post_init__(self) -> None:
        converted = {key: _as_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()}
        object.__setattr__(self, "loss_fn_inputs", converted)
        if (self.model_input_spans is None) != (self.loss_fn_input_spans is None):
            raise ValueError("Datum provenance comes as a pair: set both span lists or neither")

    def with_provenance(self, model_input: ProvenanceSpans, loss_fn_inputs: ProvenanceSpans) -> Datum:
        """A copy that names where each position came from (stable_reinforce needs it);
        each list must tile its field exactly."""
        _check_tiling("model_input", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is not None and targets.shape is not None and len(targets.shape) == 1:
            _check_tiling("loss_fn_inputs", loss_fn_inputs, targets.shape[0])
        return dataclasses.replace(self, model_input_spans=list(model_input), loss_fn_input_spans=list(loss_fn_inputs))


def _check_tiling(kwarg: str, spans: ProvenanceSpans, expected: int) -> None:
    for span in spans:
        if not isinstance(span, PromptProvenanceSpan | SampledProvenanceSpan):
            raise TypeError(f"with_provenance {kwarg}: spans must be Prompt/SampledProvenanceSpan, got {span!r}")
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(f"with_provenance {kwarg}: spans cover {total} positions but the field has {expected}")
