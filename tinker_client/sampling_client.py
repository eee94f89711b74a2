"""SamplingClient: generate from a base model or from saved sampler weights.

A SamplingClient pickles (and has a string handle), so rollout workers in other processes
can sample with it: there it opens a connection of its own with the same settings.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import json
import weakref
from typing import TYPE_CHECKING, Any

from tinker_client import _convert, types
from tinker_client._connection import Connection, ConnectionSettings
from tinker_client._submit import submit
from tinker_client.errors import UnsupportedFeatureError
from tinker_client.futures import APIFuture, BackcompatClientFuture
from tinker_rpc.v1 import sampling_pb2, service_pb2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase  # imported when a tokenizer is asked for


def check_no_retry_config(retry_config: Any | None) -> None:
    if retry_config is not None:
        raise UnsupportedFeatureError(
            "retry_config: this SDK reconnects and resends on its own, never running a request twice; "
            "set ServiceClient(reconnect_timeout=...) to bound how long it tries"
        )


@dataclasses.dataclass(frozen=True)
class _SamplerState:
    """What a SamplingClient is, without its connection: pickled, or encoded as a handle."""

    sampler_id: str
    base_model: str
    model_path: str | None
    record_stability_info: bool


class SamplingClient:
    """Samples from `model_path` (tinker://.../sampler_weights/...) or a bare `base_model`.

    >>> response = sampling_client.sample(prompt, num_samples=4, sampling_params=params).result()
    >>> response.sequences[0].tokens
    """

    def __init__(self, connection: Connection, state: _SamplerState, hold: bool = False) -> None:
        """`hold`: this instance takes a hold of its sampler now (one made by CreateSampler holds
        it already); every instance lets go when it is garbage-collected, so the server knows
        when no client holds an unnamed snapshot any more."""
        self._connection = connection
        self._state = state
        if hold:
            _hold(connection, state.sampler_id, True).result()
        release = weakref.finalize(self, _hold, connection, state.sampler_id, False)
        release.atexit = False  # a process that exits lets go of everything anyway

    @property
    def model_path(self) -> str | None:
        return self._state.model_path

    @property
    def sampler_id(self) -> str:
        return self._state.sampler_id

    def _request(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> service_pb2.SessionRequest:
        sample = sampling_pb2.SampleRequest(
            prompt=_convert.model_input(prompt),
            num_samples=num_samples,
            sampling_params=_convert.sampling_params(sampling_params),
            include_prompt_logprobs=include_prompt_logprobs,
            topk_prompt_logprobs=topk_prompt_logprobs,
            record_stability_info=self._state.record_stability_info,
            topk_sample_logprobs=topk_sample_logprobs,
            prompt_alt_tokens_k=prompt_alt_tokens_k,
            prompt_logprobs_last_n=prompt_logprobs_last_n,
        )
        if target_prompt_logprobs is not None:
            sample.target_prompt_logprobs.CopyFrom(_convert.tensor(target_prompt_logprobs, pad_value=-1))
        if self._state.model_path is not None:
            sample.model_path = self._state.model_path
        else:
            sample.base_model = self._state.base_model
        return service_pb2.SessionRequest(sample=sample)

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """`num_samples` continuations of `prompt`; returns a future at once.

        `topk_sample_logprobs=k`: the k most likely tokens at each generated position.
        `target_prompt_logprobs`: ids [len(prompt) - 1, K] whose prompt logprobs to return.
        `prompt_alt_tokens_k=k`: k draws from the model at every prompt position.
        `prompt_logprobs_last_n=n`: score only the last n prompt tokens.
        """
        request = self._request(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )
        return submit(self._connection, request, self._sample_response)

    def _sample_response(self, result: service_pb2.Result) -> types.SampleResponse:
        # A bound method: a request in flight keeps its client, and so its hold on the weights,
        # alive until the result is in, even when the caller dropped the client.
        return _convert.sample_response(result)

    async def sample_async(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> types.SampleResponse:
        """As `sample`; one await gives the response."""
        return await self.sample(
            prompt,
            num_samples,
            sampling_params,
            include_prompt_logprobs,
            topk_prompt_logprobs,
            topk_sample_logprobs,
            target_prompt_logprobs,
            prompt_alt_tokens_k,
            prompt_logprobs_last_n,
        )

    def _logprobs_request(self, prompt: types.ModelInput, last_n: int | None) -> service_pb2.SessionRequest:
        params = types.SamplingParams(max_tokens=1, temperature=0.0, stop=[])
        return self._request(prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=last_n)

    def _prompt_logprobs(self, result: service_pb2.Result) -> list[float | None]:
        return self._sample_response(result).prompt_logprobs or []

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        """log p(prompt[i] | prompt[:i]) for each prompt token; None for the first (and, with
        `prompt_logprobs_last_n=n`, for all but the last n)."""
        request = self._logprobs_request(prompt, prompt_logprobs_last_n)
        return submit(self._connection, request, self._prompt_logprobs)

    async def compute_logprobs_async(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._connection.tokenizer(self._state.base_model)

    def get_base_model(self) -> str:
        return self._state.base_model

    async def get_base_model_async(self) -> str:
        return self._state.base_model

    def get_telemetry(self) -> None:
        """This SDK sends no telemetry."""
        return None

    # -- other processes -------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles as its settings (API key included) and sampler; it reconnects when unpickled."""
        return (_restore, (self._connection.settings, self._state))

    def get_sampler_handle(self) -> str:
        """A string naming this sampler, without credentials:
        `SamplingClient.from_sampler_handle(handle)` makes a client for it in any process."""
        settings = self._connection.settings
        payload = {"base_url": settings.base_url, **dataclasses.asdict(self._state)}
        return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()

    @staticmethod
    def from_sampler_handle(handle: str, *, api_key: str | None = None) -> SamplingClient:
        """A client for the sampler behind `handle`, authenticated with `api_key` or
        $TINKER_API_KEY."""
        fields = json.loads(base64.urlsafe_b64decode(handle))
        settings = ConnectionSettings.resolve(fields.pop("base_url"), api_key)
        return _restore(settings, _SamplerState(**fields))

    def __repr__(self) -> str:
        state = self._state
        return f"SamplingClient({state.sampler_id!r}, model_path={state.model_path!r}, base_model={state.base_model!r})"


def _restore(settings: ConnectionSettings, state: _SamplerState) -> SamplingClient:
    return SamplingClient(settings.connect(), state, hold=True)


def _hold(connection: Connection, sampler_id: str, held: bool) -> concurrent.futures.Future[object]:
    request = service_pb2.HoldSamplerRequest(sampler_id=sampler_id, held=held)
    if connection.loop.is_closed() or connection.closed:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        future.set_result(None)
        return future
    return connection.unary_future(connection.stub.HoldSampler, request)


async def new_sampling_client(
    connection: Connection,
    session_id: str,
    *,
    model_path: str | None = None,
    base_model: str | None = None,
    record_stability_info: bool = False,
) -> SamplingClient:
    """Registers a sampler with the server (which checks its weights exist and are readable).
    With both `model_path` and `base_model` (as Tinker allows), it samples from `model_path`,
    whose base model must be `base_model`."""
    if model_path is None and base_model is None:
        raise ValueError("create_sampling_client: give model_path or base_model")
    weights = {"model_path": model_path} if model_path is not None else {"base_model": base_model}
    request = service_pb2.CreateSamplerRequest(
        session_id=session_id, record_stability_info=record_stability_info, **weights
    )
    response = await connection.unary(connection.stub.CreateSampler, request)
    if model_path is not None and base_model is not None and response.base_model != base_model:
        _hold(connection, response.sampler_id, False)
        raise ValueError(
            f"create_sampling_client: model_path {model_path!r} holds weights of {response.base_model!r}, "
            f"not of base_model {base_model!r}"
        )
    return registered_sampling_client(
        connection, response.sampler_id, response.base_model, response.model_path or None, record_stability_info
    )


def registered_sampling_client(
    connection: Connection, sampler_id: str, base_model: str, model_path: str | None, record_stability_info: bool
) -> SamplingClient:
    """The client of a sampler the server just registered for this caller (and counts as held)."""
    return SamplingClient(connection, _SamplerState(sampler_id, base_model, model_path, record_stability_info))


def start_sampling_client(connection: Connection, coroutine: Any) -> BackcompatSamplingClientFuture:
    return BackcompatSamplingClientFuture(asyncio.run_coroutine_threadsafe(coroutine, connection.loop))


class BackcompatSamplingClientFuture(BackcompatClientFuture[SamplingClient], SamplingClient):
    """A future of a SamplingClient (`.result()` or `await`), usable as the client for now."""

    _client_class = SamplingClient
