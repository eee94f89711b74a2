"""TrainingClient: forward, forward_backward and optim_step on one LoRA training run."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from tinker_client import _convert, types
from tinker_client._connection import Connection
from tinker_client._submit import Sequencer, all_results, submit, submit_acked, submit_all, submit_all_acked
from tinker_client.custom_loss import CustomLossFn, LossHandle, linearize
from tinker_client.errors import UnsupportedFeatureError
from tinker_client.futures import APIFuture, AwaitableConcurrentFuture, BackcompatClientFuture
from tinker_client.sampling_client import (
    BackcompatSamplingClientFuture,
    SamplingClient,
    check_no_retry_config,
    new_sampling_client,
    registered_sampling_client,
    start_sampling_client,
)
from tinker_rpc.v1 import service_pb2, training_pb2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _save_state_response(result: service_pb2.Result) -> types.SaveWeightsResponse:
    return types.SaveWeightsResponse(path=result.save_state.path)


def _save_external_response(result: service_pb2.Result) -> types.SaveWeightsExternalResponse:
    return types.SaveWeightsExternalResponse(path=result.save_weights_external.path)


def _optim_step_response(result: service_pb2.Result) -> types.OptimStepResponse:
    return types.OptimStepResponse(metrics=dict(result.optim_step.metrics))


def _save_for_sampler_response(result: service_pb2.Result) -> types.SaveWeightsForSamplerResponse:
    return types.SaveWeightsForSamplerResponse(path=result.save_weights_for_sampler.path)


def check_access_token(weights_access_token: str | None) -> None:
    if weights_access_token is not None:
        raise UnsupportedFeatureError(
            "weights_access_token: this server has no cross-account access tokens; the checkpoint's owner "
            "can publish it (RestClient.publish_checkpoint_from_tinker_path), which makes it readable by every key"
        )


class TrainingClient:
    """Trains one LoRA adapter. Requests run in the order they are made.

    >>> future = training_client.forward_backward(data, "cross_entropy")
    >>> training_client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    """

    def __init__(self, connection: Connection, info: types.GetInfoResponse, session_id: str = "") -> None:
        self._connection = connection
        self._sequencer = Sequencer(connection)
        self._info = info
        self._session_id = session_id
        self.model_id = info.model_id

    @property
    def _base_model(self) -> str:
        return self._info.model_data.model_name or ""

    def _request(self, **operation: object) -> service_pb2.SessionRequest:
        return service_pb2.SessionRequest(model_id=self.model_id, **operation)

    def _max_request_bytes(self) -> int:
        return int(self._connection.capabilities().result().max_message_bytes * 0.9)

    # -- forward / backward ----------------------------------------------------------

    def _forward_requests(
        self, kind: str, data: list[types.Datum], loss_fn: str, loss_fn_config: Mapping[str, float | str] | None
    ) -> list[service_pb2.SessionRequest]:
        """One request per chunk that fits in a message and in the server's tokens per request;
        the server runs them back to back."""
        max_tokens = self._connection.capabilities().result().max_batch_tokens or math.inf  # 0: not reported
        return [
            self._request(**{kind: _convert.forward_backward_input(chunk, loss_fn, loss_fn_config)})
            for chunk in _convert.chunk_data(data, self._max_request_bytes(), max_tokens)
        ]

    def forward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss and per-token logprobs under the current weights; no gradients."""
        requests = self._forward_requests("forward", data, loss_fn, loss_fn_config)
        return submit_all(self._sequencer, requests, _convert.forward_backward_outputs)

    async def forward_async(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        requests = self._forward_requests("forward", data, loss_fn, loss_fn_config)
        return await submit_all_acked(self._sequencer, requests, _convert.forward_backward_outputs)

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss, per-token logprobs, and gradients accumulated until the next optim_step.

        A batch larger than one message goes out as several requests, back to back; their
        gradients accumulate and their outputs come back merged, in order.
        """
        requests = self._forward_requests("forward_backward", data, loss_fn, loss_fn_config)
        return submit_all(self._sequencer, requests, _convert.forward_backward_outputs)

    async def forward_backward_async(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        requests = self._forward_requests("forward_backward", data, loss_fn, loss_fn_config)
        return await submit_all_acked(self._sequencer, requests, _convert.forward_backward_outputs)

    def forward_backward_custom(
        self,
        data: list[types.Datum],
        loss_fn: CustomLossFn | LossHandle,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Gradients of your own torch loss of the per-token logprobs; returns at once.

        `loss_fn(data, logprobs_list) -> (loss, metrics)`, or a LossHandle from
        `ServiceClient.create_custom_loss`. A `forward` runs first; the loss is evaluated
        here; then a `forward_backward` with cross-entropy weights -d loss / d logprobs
        carries the same gradient into the adapter. Requests made after this call run after
        that backward; if the loss fails, those already made fail too (nothing runs on a
        gradient that was never applied).
        """
        if loss_type_input not in (None, "logprobs"):
            raise ValueError(f"loss_type_input: {loss_type_input!r}; the loss always receives logprobs")
        if isinstance(loss_fn, LossHandle):
            loss_fn.check_inputs(data)
        forward = self.forward(_convert.targets_only(data), "cross_entropy")
        gate = self._sequencer.gate()
        loop = self._connection.loop

        async def backward() -> types.ForwardBackwardOutput:
            try:
                forward_output = await forward
                linearized, loss, metrics = await loop.run_in_executor(None, linearize, data, loss_fn, forward_output)
                requests = self._forward_requests("forward_backward", linearized, "cross_entropy", None)
            except BaseException as error:
                self._sequencer.fail(gate, error)
                raise
            pendings = self._sequencer.fill(gate, requests)
            backward_output = _convert.forward_backward_outputs(await asyncio.wrap_future(all_results(pendings)))
            return _convert.custom_output(backward_output, loss, metrics)

        return AwaitableConcurrentFuture(asyncio.run_coroutine_threadsafe(backward(), loop))

    async def forward_backward_custom_async(
        self,
        data: list[types.Datum],
        loss_fn: CustomLossFn | LossHandle,
        *,
        loss_type_input: Literal["logprobs"] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        return self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input)

    # -- optimizer -------------------------------------------------------------------

    def _optim_request(
        self, optim_params: types.OptimParams | None, adam_params: types.AdamParams | None
    ) -> service_pb2.SessionRequest:
        if (optim_params is None) == (adam_params is None):
            raise TypeError("optim_step: pass the AdamParams once, as optim_params or adam_params=")
        params = optim_params or adam_params
        if not isinstance(params, types.AdamParams):
            raise ValueError(f"optim_step: {type(params).__name__} given, but this run trains with AdamW")
        return self._request(optim_step=training_pb2.OptimStepRequest(adam_params=_convert.adam_params(params)))

    def optim_step(
        self, optim_params: types.OptimParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> APIFuture[types.OptimStepResponse]:
        """One AdamW step on the gradients accumulated since the last step; zeroes them.

        Metrics: "grad_norm" (the adapter's global norm before clipping), "learning_rate".
        """
        return submit(self._sequencer, self._optim_request(optim_params, adam_params), _optim_step_response)

    async def optim_step_async(
        self, optim_params: types.OptimParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> APIFuture[types.OptimStepResponse]:
        request = self._optim_request(optim_params, adam_params)
        return await submit_acked(self._sequencer, request, _optim_step_response)

    # -- checkpoints -----------------------------------------------------------------

    def _save_state_request(
        self, name: str, ttl_seconds: int | None, overwrite: bool, user_metadata: dict[str, str] | None
    ) -> service_pb2.SessionRequest:
        save = training_pb2.SaveStateRequest(
            name=name, ttl_seconds=ttl_seconds, overwrite=overwrite, user_metadata=user_metadata or {}
        )
        return self._request(save_state=save)

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Saves weights and optimizer state as tinker://<run>/weights/<name> (peft format +
        optimizer.safetensors). An existing name needs `overwrite=True`."""
        request = self._save_state_request(name, ttl_seconds, overwrite, user_metadata)
        return submit(self._sequencer, request, _save_state_response)

    async def save_state_async(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        request = self._save_state_request(name, ttl_seconds, overwrite, user_metadata)
        return await submit_acked(self._sequencer, request, _save_state_response)

    def _load_request(
        self, path: str, with_optimizer: bool, weights_access_token: str | None
    ) -> service_pb2.SessionRequest:
        check_access_token(weights_access_token)
        return self._request(load_state=training_pb2.LoadStateRequest(path=path, with_optimizer=with_optimizer))

    def _loaded(self, path: str) -> Callable[[service_pb2.Result], types.LoadWeightsResponse]:
        return lambda _: types.LoadWeightsResponse(path=path, model_id=self.model_id)

    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        """Replaces this run's weights with a checkpoint's; the optimizer state starts afresh."""
        return submit(self._sequencer, self._load_request(path, False, weights_access_token), self._loaded(path))

    async def load_state_async(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        request = self._load_request(path, False, weights_access_token)
        return await submit_acked(self._sequencer, request, self._loaded(path))

    def load_state_with_optimizer(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        """Replaces this run's weights and optimizer state with a `weights` checkpoint's."""
        return submit(self._sequencer, self._load_request(path, True, weights_access_token), self._loaded(path))

    async def load_state_with_optimizer_async(
        self, path: str, weights_access_token: str | None = None
    ) -> APIFuture[types.LoadWeightsResponse]:
        request = self._load_request(path, True, weights_access_token)
        return await submit_acked(self._sequencer, request, self._loaded(path))

    def save_weights_external(
        self, name: str, ttl_seconds: int | None = None, age_encryption_recipients: list[str] | None = None
    ) -> APIFuture[types.SaveWeightsExternalResponse]:
        """Exports the adapter as tinker://<run>/external_weights/<name>: peft's files, for use
        elsewhere (RestClient.get_external_weights_urls gives a URL per file). With
        `age_encryption_recipients` (age or SSH public keys) each file is encrypted to them and
        named with a `.age` suffix."""
        request = self._save_external_request(name, ttl_seconds, age_encryption_recipients)
        return submit(self._sequencer, request, _save_external_response)

    async def save_weights_external_async(
        self, name: str, ttl_seconds: int | None = None, age_encryption_recipients: list[str] | None = None
    ) -> APIFuture[types.SaveWeightsExternalResponse]:
        request = self._save_external_request(name, ttl_seconds, age_encryption_recipients)
        return await submit_acked(self._sequencer, request, _save_external_response)

    def _save_external_request(
        self, name: str, ttl_seconds: int | None, age_encryption_recipients: list[str] | None
    ) -> service_pb2.SessionRequest:
        save = training_pb2.SaveWeightsExternalRequest(
            name=name, ttl_seconds=ttl_seconds, age_encryption_recipients=age_encryption_recipients or []
        )
        return self._request(save_weights_external=save)

    # -- sampling --------------------------------------------------------------------

    def _save_request(
        self,
        name: str,
        ttl_seconds: int | None,
        user_metadata: dict[str, str] | None,
        sampler: training_pb2.NewSampler | None = None,
    ) -> service_pb2.SessionRequest:
        save = training_pb2.SaveWeightsForSamplerRequest(
            name=name, ttl_seconds=ttl_seconds, user_metadata=user_metadata or {}, sampler=sampler
        )
        return self._request(save_weights_for_sampler=save)

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Snapshots the current adapter; the result's `path` is a tinker:// sampler path.

        Later training does not change the snapshot. With `ttl_seconds` the server deletes it then.
        """
        request = self._save_request(name, ttl_seconds, user_metadata)
        return submit(self._sequencer, request, _save_for_sampler_response)

    async def save_weights_for_sampler_async(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        request = self._save_request(name, ttl_seconds, user_metadata)
        return await submit_acked(self._sequencer, request, _save_for_sampler_response)

    def create_sampling_client(
        self, model_path: str, retry_config: Any | None = None, record_stability_info: bool = False
    ) -> BackcompatSamplingClientFuture:
        """A sampling client for saved sampler weights (a future of it: `.result()` or await)."""
        check_no_retry_config(retry_config)
        coroutine = new_sampling_client(
            self._connection, self._session_id, model_path=model_path, record_stability_info=record_stability_info
        )
        return start_sampling_client(self._connection, coroutine)

    async def create_sampling_client_async(
        self, model_path: str, retry_config: Any | None = None, record_stability_info: bool = False
    ) -> SamplingClient:
        return await self.create_sampling_client(model_path, retry_config, record_stability_info)

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any | None = None,
        record_stability_info: bool = False,
        kind: types.SamplingClientKind = "snapshot",
    ) -> BackcompatSamplingClientFuture:
        """A future of a sampling client for the run's current weights.

        `kind="snapshot"` (the default) saves them: without `name` the snapshot is unnamed, usable
        as soon as the server copied it on its device, and goes once a newer one of this run exists
        and no sampling client holds it (or its TTL passes); with `name` it is kept as
        tinker://<run>/sampler_weights/<name>. `kind="inflight"` saves nothing: its samples read
        the run's live weights, each at its place in the run's order of requests.
        """
        check_no_retry_config(retry_config)
        if kind not in ("snapshot", "inflight"):
            raise ValueError(f"kind: {kind!r}; expected 'snapshot' or 'inflight'")
        if kind == "inflight":
            inflight = new_sampling_client(
                self._connection,
                self._session_id,
                model_path=f"tinker://{self.model_id}/inflight",
                record_stability_info=record_stability_info,
            )
            return start_sampling_client(self._connection, inflight)
        # One request saves the weights and registers a sampler of them, held by the new client.
        sampler = training_pb2.NewSampler(session_id=self._session_id, record_stability_info=record_stability_info)
        request = self._save_request(name or "", None, None, sampler)
        saved = submit(self._sequencer, request, lambda result: result.save_weights_for_sampler)

        async def create() -> SamplingClient:
            result = await saved
            return registered_sampling_client(
                self._connection, result.sampler_id, self._base_model, result.path, record_stability_info
            )

        return start_sampling_client(self._connection, create())

    async def save_weights_and_get_sampling_client_async(
        self,
        name: str | None = None,
        retry_config: Any | None = None,
        record_stability_info: bool = False,
        kind: types.SamplingClientKind = "snapshot",
    ) -> SamplingClient:
        return await self.save_weights_and_get_sampling_client(name, retry_config, record_stability_info, kind)

    # -- description -----------------------------------------------------------------

    def get_info(self) -> types.GetInfoResponse:
        """The run's model and LoRA configuration, as the server reported them at creation."""
        return self._info

    async def get_info_async(self) -> types.GetInfoResponse:
        return self._info

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._connection.tokenizer(self._base_model)

    def get_telemetry(self) -> None:
        """This SDK sends no telemetry."""
        return None

    def get_console_url(self) -> str:
        """The run's page in the web console (its loss curves and checkpoints); raises
        UnsupportedFeatureError when the server runs without a console (no --console-port)."""
        console_url = self._connection.capabilities().result().console_url
        return types.training.console_page(console_url, f"runs/{self.model_id}")

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self._base_model!r})"


class BackcompatTrainingClientFuture(BackcompatClientFuture[TrainingClient], TrainingClient):
    """A future of a TrainingClient (`.result()` or `await`), usable as the client for now."""

    _client_class = TrainingClient


async def fetch_training_client(connection: Connection, model_id: str, session_id: str) -> TrainingClient:
    """The client of a created run, with its description (and the server's limits) at hand."""
    response = await connection.unary(connection.stub.GetInfo, service_pb2.GetInfoRequest(model_id=model_id))
    await asyncio.wrap_future(connection.capabilities())
    return TrainingClient(connection, _convert.info(response), session_id)
