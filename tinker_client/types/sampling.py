"""Sampling types: parameters, sampled sequences and responses (numpy inside, lists on demand)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, TypeAlias

import numpy as np

from tinker_client.types._coerce import real, whole
from tinker_client.types.inputs import ModelInput
from tinker_client.types.tensors import TensorData

StopReason: TypeAlias = Literal["length", "stop"]
SamplingClientKind: TypeAlias = Literal["snapshot", "inflight"]
"""`snapshot`: fixed weights saved when the client is made. `inflight`: the run's live weights."""

MASK_LOGPROB = -99999.0
"""Log-probability of an empty top-k slot (its token id is 0)."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. `temperature=0` is greedy.

    `stop`: None stops at the model's end-of-sequence tokens; a string, list of strings or
    list of token ids stops there instead; [] disables stopping.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | Sequence[str] | Sequence[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def __post_init__(self) -> None:
        coerced = {
            "max_tokens": None if self.max_tokens is None else whole(self.max_tokens, "SamplingParams.max_tokens"),
            "seed": None if self.seed is None else whole(self.seed, "SamplingParams.seed"),
            "top_k": whole(self.top_k, "SamplingParams.top_k"),
            "temperature": real(self.temperature, "SamplingParams.temperature"),
            "top_p": real(self.top_p, "SamplingParams.top_p"),
        }
        if self.stop is not None and not isinstance(self.stop, str):  # a copy: the caller's list is theirs
            stop = [item if isinstance(item, str) else whole(item, "SamplingParams.stop") for item in self.stop]
            coerced["stop"] = stop
        for name, value in coerced.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True, slots=True)
class TopkLogprobs:
    """The k most likely tokens at each position, as two dense (length, k) matrices; empty
    slots hold token 0 and MASK_LOGPROB."""

    token_ids: np.ndarray
    logprobs: np.ndarray


def topk_to_lists(topk: TopkLogprobs) -> list[list[tuple[int, float]] | None]:
    """Each position as a list of (token_id, logprob), or None where nothing was scored."""
    rows: list[list[tuple[int, float]] | None] = []
    for tokens, logprobs in zip(topk.token_ids.tolist(), topk.logprobs.tolist(), strict=True):
        pairs = [(token, logprob) for token, logprob in zip(tokens, logprobs, strict=True) if logprob != MASK_LOGPROB]
        rows.append(pairs or None)
    return rows


@dataclass(frozen=True)
class PromptAltTokens:
    """k independent draws from the model's distribution at each prompt position after the
    first: `tokens[i]` are alternatives to `prompt[i + 1]`, both [len(prompt) - 1, k]."""

    tokens: TensorData
    logprobs: TensorData


@dataclass(frozen=True)
class SampledSequence:
    """One generated sequence; numpy fields, with lists converted on first access.

    `logprobs`: the model's own log-probabilities of the chosen tokens (temperature 1, no
    truncation), equal to what `forward` returns for them: use them for importance ratios.
    `sampling_logprobs`: under the distribution actually sampled from (after temperature,
    top-k, top-p): the true behaviour policy.
    """

    stop_reason: StopReason
    sequence_id: str
    """Distinct per sequence; names it in later requests (provenance spans)."""
    tokens_np: np.ndarray | None = field(default=None, repr=False)
    logprobs_np: np.ndarray | None = field(default=None, repr=False)
    topk_logprobs_np: TopkLogprobs | None = field(default=None, repr=False)
    sampling_logprobs_np: np.ndarray | None = field(default=None, repr=False)

    @cached_property
    def tokens(self) -> list[int]:
        return [] if self.tokens_np is None else self.tokens_np.tolist()

    @cached_property
    def logprobs(self) -> list[float] | None:
        return None if self.logprobs_np is None else self.logprobs_np.tolist()

    @cached_property
    def topk_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        return None if self.topk_logprobs_np is None else topk_to_lists(self.topk_logprobs_np)

    @cached_property
    def sampling_logprobs(self) -> list[float] | None:
        return None if self.sampling_logprobs_np is None else self.sampling_logprobs_np.tolist()


@dataclass(frozen=True)
class SampleResponse:
    """The sequences, and the prompt's log-probabilities when asked for."""

    sequences: Sequence[SampledSequence]
    prompt_logprobs_np: np.ndarray | None = field(default=None, repr=False)
    """float32 [prompt length]; NaN where nothing was scored (the first token)."""
    topk_prompt_logprobs_np: TopkLogprobs | None = field(default=None, repr=False)
    target_prompt_logprobs: TensorData | None = None
    """Logprobs of the ids asked for in `target_prompt_logprobs`, same shape, 0.0 where -1."""
    prompt_cache_hit_tokens: int = 0
    """Prompt tokens served from a prefix cache (0: none were)."""
    prompt_alt_tokens: PromptAltTokens | None = None

    @cached_property
    def prompt_logprobs(self) -> list[float | None] | None:
        """log p(prompt[i] | prompt[:i]); None where not scored (i = 0)."""
        if self.prompt_logprobs_np is None:
            return None
        return [None if np.isnan(value) else value for value in self.prompt_logprobs_np.tolist()]

    @cached_property
    def topk_prompt_logprobs(self) -> list[list[tuple[int, float]] | None] | None:
        return None if self.topk_prompt_logprobs_np is None else topk_to_lists(self.topk_prompt_logprobs_np)


@dataclass(frozen=True)
class SampleRequest:
    """A sampling request as Tinker's SamplingClient builds it (for code that logs or builds one)."""

    prompt: ModelInput
    sampling_params: SamplingParams
    num_samples: int = 1
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    target_prompt_logprobs: TensorData | None = None
    prompt_alt_tokens_k: int = 0
    prompt_logprobs_last_n: int | None = None
    record_stability_info: bool | None = None
    type: Literal["sample"] = "sample"
