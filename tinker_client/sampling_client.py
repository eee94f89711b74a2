"""SamplingClient: generate from a base model or from saved sampler weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tinker_client import _convert, types
from tinker_client._connection import Connection, submit, submit_acked
from tinker_client.futures import APIFuture
from tinker_rpc.v1 import sampling_pb2, service_pb2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # imported when a tokenizer is asked for


class SamplingClient:
    """Samples from `model_path` (tinker://.../sampler_weights/...) or a bare `base_model`.

    >>> response = sampling_client.sample(prompt, num_samples=4, sampling_params=params).result()
    >>> response.sequences[0].tokens
    """

    def __init__(
        self,
        connection: Connection,
        *,
        base_model: str,
        model_path: str | None,
        tokenizer_loader: Callable[[], PreTrainedTokenizerBase],
    ) -> None:
        self._connection = connection
        self._base_model = base_model
        self._model_path = model_path
        self._tokenizer_loader = tokenizer_loader

    @property
    def model_path(self) -> str | None:
        return self._model_path

    def _request(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool,
        topk_prompt_logprobs: int,
    ) -> service_pb2.SessionRequest:
        sample = sampling_pb2.SampleRequest(
            prompt=_convert.tokens_to_proto(prompt.to_numpy()),
            num_samples=num_samples,
            sampling_params=_convert.sampling_params(sampling_params),
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
        )
        if self._model_path is not None:
            sample.model_path = self._model_path
        else:
            sample.base_model = self._base_model
        return service_pb2.SessionRequest(sample=sample)

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[types.SampleResponse]:
        request = self._request(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs)
        return submit(self._connection, request, _convert.sample_response)

    async def sample_async(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
    ) -> APIFuture[types.SampleResponse]:
        request = self._request(prompt, num_samples, sampling_params, include_prompt_logprobs, topk_prompt_logprobs)
        return await submit_acked(self._connection, request, _convert.sample_response)

    def _logprobs_request(self, prompt: types.ModelInput) -> service_pb2.SessionRequest:
        params = types.SamplingParams(max_tokens=1, temperature=0.0, stop=[])
        return self._request(prompt, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=0)

    @staticmethod
    def _prompt_logprobs(result: service_pb2.Result) -> list[float | None]:
        return _convert.sample_response(result).prompt_logprobs or []

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for each prompt token; None for the first."""
        return submit(self._connection, self._logprobs_request(prompt), self._prompt_logprobs)

    async def compute_logprobs_async(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        return await submit_acked(self._connection, self._logprobs_request(prompt), self._prompt_logprobs)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer_loader()

    def get_base_model(self) -> str:
        return self._base_model

    async def get_base_model_async(self) -> str:
        return self._base_model

    def __repr__(self) -> str:
        return f"SamplingClient(model_path={self._model_path!r}, base_model={self._base_model!r})"
